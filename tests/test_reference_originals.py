"""The originals' headline numbers in the report's reference table (reference.py ``ORIGINALS``): a record set built to
an original's exact protocol gets its number beside it under its source's label; one setting off removes it and
`mismatches` names that setting (with why, where prolip runs it differently); the paper's matches are as before."""

import re

import pytest

from prolip.bench.reference import (
    ELEVEN,
    OOD,
    ORIGINALS,
    PAPER,
    PAPER_TEMPLATES,
    REFERENCES,
    TEMPLATE_RULES,
    Reference,
    _checks,
    mismatches,
    reference_for,
)
from prolip.bench.report import aggregate, markdown

CLIP_SVD_SEEDS = (1, 2, 3)


def _rec(dataset, seed, acc, **kw):
    base = {
        "protocol": "fewshot",
        "model": "ViT-B-16",
        "weights": "openai",
        "random_weights": False,
        "sampler": "clip-lora",
        "templates_name": "dataset",
        "templates": list(TEMPLATE_RULES["clip-svd"][dataset]),
        "source": None,
        "label": "clip-svd",
        "method": "clip-svd",
        "shots": 1,
        "dataset": dataset,
        "seed": seed,
        "views": 300,
        "aug_seed": 0,
        "validation": False,
        "setting": None,
        "fingerprint": "f",
        "group": None,
        "accuracy": acc,
        "hyperparameters": _clip_svd_hp(),
    }
    return {**base, **kw}


def _clip_svd_ref(shots=1) -> Reference:
    return next(r for r in ORIGINALS if r.method == "clip-svd" and r.metric == "accuracy" and r.shots == shots)


def _clip_svd_hp() -> dict:
    return dict(_clip_svd_ref().hyperparameters)


def _clip_svd_records(seeds=CLIP_SVD_SEEDS, **kw):
    return [_rec(d, s, 70.0 + s + i / 10, **kw) for i, d in enumerate(sorted(ELEVEN)) for s in seeds]


def _average(rows):
    return next(r for r in rows if r["kind"] == "average" and r.get("subset") is None)


def test_a_record_set_on_clip_svds_exact_protocol_gets_its_number_under_its_source():
    rows = aggregate(_clip_svd_records())
    avg = _average(rows)
    assert avg["paper"] == 73.20 and avg["paper_label"] == "CLIP-SVD README"
    assert "HealthX-Lab/CLIP-SVD README.md" in avg["paper_source"] and "Natural Few-shot" in avg["paper_source"]
    md = markdown(rows)
    assert "(CLIP-SVD README 73.20)" in md and not re.search(r"\(paper \d", md)
    assert "(CLIP-SVD README x): HealthX-Lab/CLIP-SVD README.md, Natural Few-shot Evaluation table" in md
    assert _average(aggregate(_clip_svd_records(shots=16)))["paper"] == 82.97


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda rs: [r for r in rs if r["seed"] != 3], "seeds"),
        (lambda rs: rs + [{**r, "seed": 4} for r in rs if r["seed"] == 3], "seeds"),
        (lambda rs: [{**r, "model": "RN50"} for r in rs], "model"),
        (lambda rs: [{**r, "validation": True} for r in rs], "validation"),
        (lambda rs: [{**r, "templates": list(PAPER_TEMPLATES[r["dataset"]])} for r in rs], "templates"),
    ],
)
def test_one_setting_off_removes_the_number_and_mismatches_names_it(change, named):
    rows = aggregate(change(_clip_svd_records()))
    assert not any(r.get("paper") for r in rows)
    avg = _average(rows)
    assert mismatches(_clip_svd_ref(), avg, frozenset(ELEVEN)) == [named]


def test_prolips_own_runs_of_clip_svd_say_why_they_cannot_match():
    """What prolip runs (its coop or lpp sampler, float32 without a precision) never gets the README's number."""
    hp = {k: v for k, v in _clip_svd_hp().items() if k != "precision"}
    rows = aggregate(_clip_svd_records(sampler="coop", hyperparameters=hp))
    assert not any(r.get("paper") for r in rows)
    why = mismatches(_clip_svd_ref(), _average(rows), frozenset(ELEVEN))
    assert [w.split(":")[0] for w in why] == ["sampler", "hyperparameters"]
    assert "validation images per class before the K support images" in why[0] and "float16 autocast" in why[1]


def test_the_studys_siglip2_numbers_match_only_on_its_protocol():
    study = dict(
        protocol="fewshot-val",
        model="ViT-B-16-SigLIP2",
        weights="webli",
        sampler="task-text splits",
        method="prolip",
        label="prolip",
        views=32,
        validation=True,
        shots=4,
    )
    ref = next(r for r in ORIGINALS if r.model == "ViT-B-16-SigLIP2" and r.method == "prolip" and r.shots == 4)
    hp = dict(ref.hyperparameters)
    records = [
        _rec(d, s, 70.0, templates=list(PAPER_TEMPLATES[d]), hyperparameters=hp, **study)
        for d in ("DescribableTextures", "EuroSAT")
        for s in (1, 2, 3)
    ]
    rows = aggregate(records)
    dtd = next(r for r in rows if r["kind"] == "dataset" and r["dataset"] == "DescribableTextures")
    assert dtd["paper"] == 73.48 and dtd["paper_label"] == "task-text study"
    assert "SigLIP 2 Base/16 table" in dtd["paper_source"]
    lpp = aggregate([{**r, "sampler": "lpp"} for r in records])
    assert not any(r.get("paper") for r in lpp)
    dtd = next(r for r in lpp if r["kind"] == "dataset" and r["dataset"] == "DescribableTextures")
    (why,) = mismatches(ref, dtd, "DescribableTextures")
    assert why.startswith("sampler: the study's own split manifests")


def test_dpe_numbers_name_their_prompts_as_why_no_tta_row_gets_them():
    row = {
        "protocol": "tta",
        "model": "RN50",
        "weights": "openai",
        "random_weights": False,
        "sampler": "lpp",
        "label": "dpe",
        "method": "zeroshot",
        "shots": 0,
        "seeds": [None],
        "views": 300,
        "validation": False,
        "templates": {d: list(PAPER_TEMPLATES[d]) for d in ["ImageNet", *OOD]},
        "hyperparameters": {},
        "varying": {},
        "setting": {"tta": {"max_images": None}},
        "source": None,
    }
    five = frozenset({"ImageNet"}) | OOD
    ref = next(r for r in ORIGINALS if r.label == "dpe" and r.model == "RN50" and r.datasets == five)
    assert ref.value == 50.81 and "2410.12790" in ref.source and "Table 1" in ref.source
    (why,) = mismatches(ref, row, five)
    assert why.startswith("templates: DPE's hand-crafted prompts")
    assert reference_for(row, five) is None


def test_the_papers_matches_are_unchanged():
    from tests.test_report import eleven

    rows = aggregate(eleven())
    avg = _average(rows)
    assert avg["paper"] == 64.28 and avg["paper_source"] == PAPER and avg["paper_label"] == "paper"
    md = markdown(rows)
    assert "(paper 64.28)" in md and f"Paper numbers from {PAPER}." in md and "Reference numbers" not in md


def test_every_original_cites_its_source_and_explains_only_real_checks():
    checks = set(_checks(ORIGINALS[0], {}, ELEVEN, "accuracy"))
    assert ORIGINALS and all(r in REFERENCES for r in ORIGINALS)
    for ref in ORIGINALS:
        assert ref.source != PAPER and ref.short != "paper" and ref.why
        assert ref.seeds == ((1, 2, 3) if ref.protocol != "tta" else ())
        assert {check for check, _ in ref.why} <= checks
