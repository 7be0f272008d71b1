"""The paper's reference numbers (SPEC §4), shown beside ours only where model, weights and protocol match.

Source: Fahes et al., arXiv 2410.05270, 11-dataset averages, top-1 %, OpenAI weights, LP++/ProLIP sampler, seeds
1–10, per-dataset templates.
"""
REFERENCE = {
    # (model, protocol, label, shots): value
    **{("RN50", "fewshot", "prolip", s): v for s, v in zip((1, 2, 4, 8, 16), (64.28, 67.07, 69.68, 72.57, 75.20))},
    **{("RN50", "fewshot", "tip-adapter-f", s): v for s, v in zip((1, 16), (64.60, 75.83))},
    **{("ViT-B-16", "fewshot", "lp++", s): v for s, v in zip((1, 16), (70.35, 80.32))},
    **{("ViT-B-16", "fewshot", "tip-adapter-f", s): v for s, v in zip((1, 16), (70.62, 81.15))},
    ("RN50", "fewshot", "zeroshot", 0): 58.89,
    ("ViT-B-16", "base2new", "prolip", 16): 78.61,
}
ELEVEN = 11


def reference_for(model: str, weights: str, random_weights: bool, protocol: str, label: str, shots: int,
                  n_datasets: int):
    """The paper's number for an 11-dataset average, or None where the setting differs."""
    if random_weights or weights != "openai" or n_datasets != ELEVEN:
        return None
    return REFERENCE.get((model, protocol, label, shots))
