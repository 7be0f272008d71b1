"""No silent baseline failure: on prolip-tiny's shifted digits, at 16 shots, every learned method is not below both
zero-shot and the linear probe by more than MARGIN points (means over seeds), unless its docstring documents why and
the documented cause is checked here.

Measured (seeds 1-3, 4 views, defaults, content-seeded views), zero-shot / linear probe: inverted 11.2 / 57.9,
noisy 64.2 / 71.1. The closest of the feature methods to the floor were gda 63.9 and prolip-text 63.8 on noisy
digits (-0.3, -0.4); the one method far below it is validation-free LP++ on noisy digits, 47.3, documented in
prolip.methods.lp_plus_plus (its original always keeps the epoch of best validation accuracy; run to the last of its
300 epochs, its unregularised step overfits the support set: 67.4 at 5 epochs, 47.3 at 300;
benchmarks/lpp_epochs.py). Methods that train inside the image
encoder run at small stated budgets (IMAGE_BUDGETS: the defaults take minutes per fit on a CPU) and two seeds.

Not covered: clip-lora. At 10 and 30 steps per shot it scored 60.7 and 58.3 / 55.3 on noisy digits (seeds 1 / 1-2;
zero-shot 64.3 / 64.0), below the floor, and its default budget (500 steps per shot) takes about ten minutes per
fit here, so whether that is under-training or a real failure is not yet measured.

Not covered: clip-svd. At 1, 3, 10 and 30 steps per shot it scored 60.3, 61.3, 60.8 and 63.0 on noisy digits (seeds
1-2; floor 61.2) and 12.0-13.2 on inverted digits (floor 8.5): around the noisy floor, as CLIP-LoRA, and the budget
that clears it reliably (30 steps) takes minutes per domain here.
"""

from __future__ import annotations

import sys
from statistics import mean

import pytest
import torch

from prolip.methods import available, method_class
from test_behaviour import DigitsBench

MARGIN = 3.0
DOMAINS = ("inverted", "noisy")
FEATURE_SEEDS, IMAGE_SEEDS = (1, 2, 3), (1, 2)
IMAGE_BUDGETS = {"full-ft": {"epochs": 10}, "last-layer-ft": {"epochs": 10}, "2sfs": {"steps": 3}}
NOT_COVERED = {"clip-lora", "clip-svd"}  # see the module docstring
# (method, domain): what the method's docstring says, and the setting under which the documented cause goes away.
DOCUMENTED = {("lp++", "noisy"): ("Validation-free, it overfits", {"epochs": 5})}


class TextSideBench(DigitsBench):
    """DigitsBench whose episodes carry the text side, for the methods that adapt the text projection."""

    def episode(self, domain, seed, shots, classes=None):
        from prolip.episode import EpisodeSpec

        key = (domain, seed, shots, classes)
        if key not in self._episodes:
            spec = EpisodeSpec(shots=shots, seed=seed, views=self.views, classes=classes)
            self._episodes[key] = self.builder.build(self.splits(domain, seed), spec, text_side=True)
        return self._episodes[key]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two workers share two cores: one thread each (as tests/test_behaviour.py)
    yield TextSideBench(tmp_path_factory.mktemp("floor"))
    torch.set_num_threads(threads)


# prolip's own methods (a test may register a toy one, e.g. tests/toy_method.py, in the same process).
BUILT_IN = [n for n in available() if method_class(n).__module__.startswith("prolip.methods.")]
LEARNED = [n for n in BUILT_IN if method_class(n).capabilities.learns and n not in NOT_COVERED]


def _floor(bench, domain: str, seeds) -> float:
    zero_shot = mean(bench.zero_shot(domain, s) for s in seeds)
    return min(zero_shot, mean(bench.accuracy(domain, s, 16, "linear-probe") for s in seeds)) - MARGIN


def test_every_learned_method_is_covered_or_named():
    assert (
        set(BUILT_IN) - set(LEARNED) == {n for n in BUILT_IN if not method_class(n).capabilities.learns} | NOT_COVERED
    )
    assert set(IMAGE_BUDGETS) | NOT_COVERED == {
        n for n in LEARNED + sorted(NOT_COVERED) if method_class(n).capabilities.encodes_images
    }


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("name", LEARNED)
def test_no_learned_method_is_silently_below_zero_shot_and_the_linear_probe(bench, name, domain):
    image = method_class(name).capabilities.encodes_images
    seeds, hp = (IMAGE_SEEDS, IMAGE_BUDGETS[name]) if image else (FEATURE_SEEDS, {})
    floor = _floor(bench, domain, seeds)
    if (name, domain) in DOCUMENTED:
        word, cured = DOCUMENTED[(name, domain)]
        assert word in (sys.modules[method_class(name).__module__].__doc__ or ""), f"{name}'s docstring says why"
        hp = cured  # the documented cause: with it removed, the method is above the floor
    accuracy = mean(bench.accuracy(domain, s, 16, name, **hp) for s in seeds)
    assert accuracy >= floor, f"{name} on {domain}: {accuracy:.1f} < floor {floor:.1f} ({hp or 'defaults'})"
