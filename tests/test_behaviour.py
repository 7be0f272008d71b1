"""The paper's claims, at small scale, on prolip-tiny (the in-house CLIP pretrained on scikit-learn's digits).

Every number comes through the product's own path: held-out digits written as image folders, one per domain
(prolip.tiny.DOMAINS), read like a user's folder, split into a 16-per-class support pool and 30 test images per class
(the demo's split), episodes from prolip.episode.EpisodeBuilder on a FeatureCache, methods from prolip.methods,
test-time adaptation from prolip.tta. Features are cached once per module.

Thresholds are set from measured runs with margins: the measured numbers sit in the comments beside each assertion.
"Measured" is seeds 1-3 (SEEDS, what the tests run) with views seeded by image content (issue 27): two runs, each in
a fresh folder, printed identical numbers (before, views were seeded per image file and moved with every fresh
folder: the 16-shot mild-shift mean ranged from -1.8 to +4.8). "Worst 3 seeds" is from the earlier path-seeded runs
of seeds 1-8. Reproduce the measurements (about 10 minutes on 2 busy cores) with

    HF_HUB_OFFLINE=1 .venv/bin/python tests/test_behaviour.py 1 2 3

The tests compare means over SEEDS.

Domains: "inverted" (white ink on black) is a severe shift, zero-shot at chance; "noisy" (Gaussian pixel noise,
σ = 0.5 of the range) is a mild one, where zero-shot still gets about two thirds right.
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import mean

import pytest
import torch

SEEDS = (1, 2, 3)
VIEWS = 4
HIGH_LR = 1e-2
SEVERE, MILD = "inverted", "noisy"


class DigitsBench:
    """Episodes and accuracies of prolip-tiny on held-out digits, one image folder per domain."""

    def __init__(self, root: Path, views: int = VIEWS):
        from prolip.episode import EpisodeBuilder
        from prolip.features import FeatureCache
        from prolip.tiny import load_tiny

        self.root, self.views = root, views
        self.backbone = load_tiny()
        self.cache = FeatureCache(root / "cache", self.backbone, progress=False)
        self.builder = EpisodeBuilder(self.backbone, self.cache)
        self._episodes: dict[tuple, object] = {}
        self._accuracies: dict[tuple, float] = {}  # several tests read the same fits

    def splits(self, domain: str, seed: int):
        from prolip.data import read_image_folder
        from prolip.data.types import DatasetSplits
        from prolip.demo import split_pool_and_test
        from prolip.tiny import DIGIT_TEMPLATES, write_digit_folder

        images = read_image_folder(write_digit_folder(self.root / domain, domain))
        pool, test = split_pool_and_test(images, 16, 30, seed)
        return DatasetSplits(domain, images.classnames, DIGIT_TEMPLATES, train=pool, test=test)

    def episode(self, domain: str, seed: int, shots: int, classes: tuple[int, ...] | None = None):
        from prolip.episode import EpisodeSpec

        key = (domain, seed, shots, classes)
        if key not in self._episodes:
            spec = EpisodeSpec(shots=shots, seed=seed, views=self.views, classes=classes)
            self._episodes[key] = self.builder.build(self.splits(domain, seed), spec)
        return self._episodes[key]

    def zero_shot(self, domain: str, seed: int) -> float:
        from prolip.functional import accuracy, clip_logits

        ev, task = self.episode(domain, seed, 1).evaluation, self.episode(domain, seed, 1).task
        return accuracy(clip_logits(ev.features, task.W0, task.bias, task.classifier, task.logit_scale), ev.labels)

    def fit(self, domain: str, seed: int, shots: int, method: str = "prolip", classes=None, **hyperparameters):
        from prolip.methods import create

        episode = self.episode(domain, seed, shots, classes)
        return create(method, **hyperparameters).fit(episode.task, episode.support, None, seed=seed), episode

    def accuracy(self, domain: str, seed: int, shots: int, method: str = "prolip", **hyperparameters) -> float:
        from prolip.episode import method_logits
        from prolip.functional import accuracy

        key = (domain, seed, shots, method, tuple(sorted(hyperparameters.items())))
        if key not in self._accuracies:
            fitted, episode = self.fit(domain, seed, shots, method, **hyperparameters)
            self._accuracies[key] = accuracy(method_logits(fitted, episode.evaluation), episode.evaluation.labels)
        return self._accuracies[key]

    def base_to_new(self, domain: str, seed: int, shots: int, **hyperparameters) -> tuple[float, float]:
        """(zero-shot, adapted) accuracy on the new classes' test images after adapting on the base classes,
        each scored with the new classes' own text classifier (the bench's base-to-new protocol)."""
        from prolip.data.sampling import base_new_split
        from prolip.episode import restrict
        from prolip.functional import accuracy, clip_logits

        splits = self.splits(domain, seed)
        base, new = base_new_split(len(splits.classnames))
        fitted, episode = self.fit(domain, seed, shots, classes=tuple(base), **hyperparameters)
        new_images = restrict(splits.test, new)
        features = self.builder.center(new_images)
        T_new = self.builder.classifier(new_images.classnames, splits.templates)
        task = episode.task
        zero_shot = clip_logits(features.features, task.W0, task.bias, T_new, task.logit_scale)
        return (
            accuracy(zero_shot, features.labels),
            accuracy(fitted.logits(features.features, classifier=T_new), features.labels),
        )

    def test_time(self, domain: str, seed: int, images_per_class: int = 10, **options) -> tuple[float, float]:
        """(zero-shot, test-time ProLIP from W0) accuracy on the first test images of each class."""
        from prolip.functional import accuracy, clip_logits
        from prolip.tta import tta_logits

        episode = self.episode(domain, seed, 1)
        ev, task = episode.evaluation, episode.task
        keep = torch.cat([torch.nonzero(ev.labels == c)[:images_per_class, 0] for c in range(task.num_classes)])
        paths = [ev.images.items[i].path for i in keep.tolist()]
        zero_shot = clip_logits(ev.features[keep], task.W0, task.bias, task.classifier, task.logit_scale)
        adapted = tta_logits(
            self.backbone, task.W0, task.bias, task.classifier, task.logit_scale, paths, seed=seed, **options
        )
        return accuracy(zero_shot, ev.labels[keep]), accuracy(adapted, ev.labels[keep])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    # Two pytest workers share two cores: one torch thread each runs these small problems several times faster than
    # two threads fighting over a busy core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DigitsBench(tmp_path_factory.mktemp("behaviour"))
    torch.set_num_threads(threads)


def over_seeds(measure) -> float:
    """The mean over SEEDS of ``measure(seed)``: every claim is asserted on means, never on one lucky draw."""
    return mean(measure(seed) for seed in SEEDS)


# -- the claims -------------------------------------------------------------------------------------------------------
def test_zero_shot_knows_the_clean_held_out_digits(bench):
    """Zero-shot CLIP is the starting point of every table in the paper: here it must know digits it never saw."""
    # Measured (300 test digits each): 96.2% mean, 95.7% worst single seed; chance is 10%.
    assert over_seeds(lambda s: bench.zero_shot("clean", s)) >= 85.0


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_prolip_beats_zero_shot_on_a_severe_shift_and_improves_with_shots(bench, lr):
    """Tables 2/11 (validation-free ProLIP, λ = 1/N, lr 1e-5…1e-2): ProLIP climbs above zero-shot and with shots.

    Inverted digits: zero-shot is at chance (measured 11.2%)."""
    zero_shot = over_seeds(lambda s: bench.zero_shot(SEVERE, s))
    four = over_seeds(lambda s: bench.accuracy(SEVERE, s, 4, lr=lr, lam="1/N"))
    sixteen = over_seeds(lambda s: bench.accuracy(SEVERE, s, 16, lr=lr, lam="1/N"))
    # Measured means: lr 1e-3: 4-shot 30.2, 16-shot 49.3; lr 1e-2: 33.2, 63.1.
    # Gains over zero-shot, worst 3 seeds: 4-shot 18.0 (lr 1e-3) and 22.3 (1e-2); 16-shot 34.7 and 50.4.
    assert four >= zero_shot + 12
    assert sixteen >= zero_shot + 25
    assert sixteen >= four + 8  # 16 over 4 shots, worst 3 seeds: 11.2 (lr 1e-3), 24.7 (lr 1e-2)


def test_prolip_beats_zero_shot_on_a_mild_shift(bench):
    """The same claim where zero-shot already knows a lot (noisy digits, zero-shot 64.2% measured): a small gain at
    4 shots, and at 16 shots (lr 1e-2) only "not below zero-shot" holds with a margin."""

    def gain(shots: int, seeds=SEEDS) -> float:
        return mean(bench.accuracy(MILD, s, shots, lr=HIGH_LR, lam="1/N") - bench.zero_shot(MILD, s) for s in seeds)

    # Measured mean gain: 4-shot +3.3 (per seed +1.0, +4.3, +4.7); 16-shot +1.8 (-0.6, +2.3, +3.7), the same in
    # every fresh folder now views follow the images' content (with path-seeded views it ranged from -1.8 to +4.8
    # across folders and was asserted over seeds 1-8); 2.8 points above the threshold over the three tested seeds.
    assert gain(4) >= 1.5
    assert gain(16) >= -1.0


@pytest.mark.parametrize("shots", [1, 4])
def test_on_a_mild_shift_lambda_zero_at_a_high_lr_forgets_what_lambda_1_over_n_keeps(bench, shots):
    """Figure 3 / Table 10 (lr × λ): without the pull back to W0, a high lr overfits the few shots and falls below
    zero-shot; λ = 1/N at the same lr keeps zero-shot knowledge and adds to it."""
    zero_shot = over_seeds(lambda s: bench.zero_shot(MILD, s))
    kept = over_seeds(lambda s: bench.accuracy(MILD, s, shots, lr=HIGH_LR, lam="1/N"))
    forgot = over_seeds(lambda s: bench.accuracy(MILD, s, shots, lr=HIGH_LR, lam=0.0))
    # Measured means: 1-shot λ = 1/N 69.0, λ = 0 43.0; 4-shot 67.5 vs 46.8; zero-shot 64.2. Worst 3 seeds: gap 20.4
    # (1-shot) and 20.6 (4-shot); λ = 0 15.7 below zero-shot.
    assert kept >= forgot + 12
    assert forgot <= zero_shot - 6


@pytest.mark.parametrize("shots", [1, 4])
def test_lambda_1_over_n_is_insensitive_to_the_learning_rate(bench, shots):
    """Figure 3 / Table 10: with λ = 1/N, lr 1e-5…1e-2 give about the same accuracy; with λ = 0 they do not.

    Where this model differs from the paper: its projection entries (~0.09) and logit scale (14) make 300 steps at
    1e-5 move predictions little (+2 points over zero-shot), so the λ = 1/N spread is mostly 1e-5 against the rest;
    from 1e-4 to 1e-2 it is within 1.5 points."""
    lrs = (1e-5, 1e-4, 1e-3, 1e-2)
    regularised = [over_seeds(lambda s: bench.accuracy(MILD, s, shots, lr=lr, lam="1/N")) for lr in lrs]
    free = [over_seeds(lambda s: bench.accuracy(MILD, s, shots, lr=lr, lam=0.0)) for lr in lrs]
    # Measured means over lr 1e-5, 1e-4, 1e-3, 1e-2:
    #   1-shot λ = 1/N 65.9 70.3 68.8 69.0 (spread 4.4), λ = 0 65.9 68.9 49.4 43.0 (spread 25.9)
    #   4-shot λ = 1/N 66.5 70.0 67.5 67.5 (spread 3.5), λ = 0 66.5 69.0 56.5 46.8 (spread 22.2)
    # Worst 3 seeds: λ = 1/N spread 6.7, λ = 0 spread 20.8, ratio 3.8.
    spread = max(regularised) - min(regularised)
    assert spread <= 8
    assert max(free) - min(free) >= max(15.0, 2 * spread)


@pytest.mark.parametrize("shots", [1, 4])
def test_on_a_severe_shift_the_regulariser_costs_accuracy(bench, shots):
    """Said plainly: where zero-shot knows nothing (inverted digits, at chance), pulling W back toward W0 holds
    adaptation back, and λ = 0 at lr 1e-2 does better at few shots; by 16 shots the two meet (λ = 0 62.8 against
    λ = 1/N 63.1 measured)."""
    free = over_seeds(lambda s: bench.accuracy(SEVERE, s, shots, lr=HIGH_LR, lam=0.0))
    regularised = over_seeds(lambda s: bench.accuracy(SEVERE, s, shots, lr=HIGH_LR, lam="1/N"))
    # Measured means: 1-shot λ = 0 29.9 vs λ = 1/N 14.5; 4-shot 47.0 vs 33.2.
    # Worst 3 seeds: λ = 0 ahead by 8.2 (1-shot) and 6.9 (4-shot).
    assert free >= regularised + 5


@pytest.mark.parametrize("domain", ["clean", MILD])
def test_base_to_new_lambda_1_over_n_keeps_new_classes_near_zero_shot(bench, domain):
    """Tables 5/14/15 (base-to-new, ViT-B/16 at 16 shots): adapting on the base classes (the first 5 labels) leaves
    new-class accuracy near zero-shot with λ = 1/N; with λ = 0 it drops much further."""
    results = {lam: [bench.base_to_new(domain, s, 16, lr=HIGH_LR, lam=lam) for s in SEEDS] for lam in ("1/N", 0.0)}
    zero_shot = mean(z for z, _ in results["1/N"])
    kept, forgot = (mean(a for _, a in results[lam]) for lam in ("1/N", 0.0))
    # Measured means, new classes: clean zero-shot 98.4, λ = 1/N 95.3, λ = 0 65.3; noisy zero-shot 81.1,
    # λ = 1/N 79.3, λ = 0 61.1. Worst 3 seeds: λ = 1/N 3.3 below zero-shot,
    # λ = 0 14.9 below λ = 1/N.
    assert kept >= zero_shot - 5
    assert forgot <= kept - 10


@pytest.mark.parametrize("domain", [SEVERE, MILD])
def test_test_time_prolip_does_not_lower_accuracy_on_a_shifted_domain(bench, domain):
    """Table 9 (test-time ProLIP from W0: 64 views, the 10% most confident, one AdamW step, reset per image): on
    average over seeds it does not lower zero-shot accuracy. lr 1e-3 here: at the paper's 1e-4 one step leaves this
    model's predictions unchanged (measured: identical on every inverted digit). At 1e-2 it gains on inverted digits
    (+5.7) but loses on noisy ones (−3.6): entropy minimisation also sharpens confident mistakes."""

    def change(seed: int) -> float:
        zero_shot, adapted = bench.test_time(domain, seed, images_per_class=10, lr=1e-3)
        return adapted - zero_shot

    # Measured change in points (100 test digits each, one digit = 1 point): inverted +1 +1 +3 (mean +1.7);
    # noisy −1 +2 −1 (mean 0.0). Worst 3 seeds: 0.0 (inverted), −1.3 (noisy).
    assert over_seeds(change) >= -2.5


# -- measurements behind the thresholds ------------------------------------------------------------------------------
def measure(seeds, root: Path, echo=print) -> None:
    """Print every number the tests assert on, per seed (the script entry point below)."""
    import json
    import time

    torch.set_num_threads(1)
    bench, started = DigitsBench(root), time.perf_counter()
    for seed in seeds:
        row: dict = {"seed": seed}
        for domain in ("clean", SEVERE, MILD):
            row[f"{domain} zs"] = bench.zero_shot(domain, seed)
        for domain in ("clean", SEVERE, MILD):
            for shots in (1, 4, 16):
                for lr in (1e-5, 1e-4, 1e-3, 1e-2):
                    for lam in ("1/N", 0.0):
                        row[f"{domain} {shots} {lr:g} {lam}"] = bench.accuracy(domain, seed, shots, lr=lr, lam=lam)
                row[f"{domain} {shots} lp++"] = bench.accuracy(domain, seed, shots, "lp++")
        for domain in ("clean", MILD):
            for shots in (4, 16):
                for lr in (1e-3, 1e-2):
                    for lam in ("1/N", 0.0):
                        key = f"b2n {domain} {shots} {lr:g} {lam}"
                        row[key] = bench.base_to_new(domain, seed, shots, lr=lr, lam=lam)
        for domain in (SEVERE, MILD):
            for lr in (1e-4, 1e-3, 1e-2):
                row[f"tta {domain} {lr:g}"] = bench.test_time(domain, seed, lr=lr)
        echo(
            json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()})
            + f"  # {time.perf_counter() - started:.0f} s"
        )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        measure([int(s) for s in sys.argv[1:]] or list(SEEDS), Path(tmp))
