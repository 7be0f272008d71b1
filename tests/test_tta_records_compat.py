"""Records written before test-time methods had one interface keep their cell ids: the ``setting`` a tta cell records
and each cell's label, method, shots and seed are pinned to what the code wrote then (computed with it, at commit
40dbf16, and written out here), for experiment files with the older flags (``tpt: true``, ``zero_gamma``, ...) and
for the same rows written as a ``methods:`` list."""

from __future__ import annotations

import pytest

from prolip.bench.experiment import parse_experiment
from prolip.bench.records import cell_id

BASE = {
    "views": 64,
    "ratio": 0.1,
    "steps": 1,
    "lr": 0.0001,
    "seed": 0,
    "max_images": None,
    "tpt": False,
    "ensemble": False,
    "train_on": None,
}
RN50 = {"views": 64, "ratio": 0.1, "steps": 1, "lr": 1e-4, "tpt": True, "ensemble": True, "train_on": "imagenet"}
VITB16 = {
    **{"views": 64, "ratio": 0.1, "steps": 1, "lr": 1e-4, "tpt": True, "ensemble": False, "train_on": "imagenet"},
    **{"zeroshot": True, "zero": True, "zero_gamma": 0.3, "tda": True, "tda_orders": [1, 2, 3, 4, 5]},
}
EVERY = {"tpt": True, "ensemble": True, "zeroshot": True, "zero": True, "tda": True}
EVERY_SET = {"seed": 3, "steps": 2, "lr": 0.01, "ratio": 0.25, "max_images": 100}

# (the tta section with the older flags, the same rows as a methods list, the setting the old code recorded)
SETTINGS = [
    ({}, {}, BASE),
    ({"tpt": True}, {"methods": ["tpt"]}, {**BASE, "tpt": True}),
    (
        {"ensemble": True, "views": 3, "max_images": 6},
        {"methods": ["ensemble"], "views": 3, "max_images": 6},
        {**BASE, "views": 3, "max_images": 6, "ensemble": True},
    ),
    ({"zeroshot": True}, {"methods": ["zeroshot"]}, {**BASE, "zeroshot": True}),
    ({"zero": True}, {"methods": ["zero"]}, {**BASE, "zero": True, "zero_gamma": 0.3}),
    (
        {"zero": True, "zero_gamma": 0.5},
        {"methods": [{"zero": {"gamma": 0.5}}]},
        {**BASE, "zero": True, "zero_gamma": 0.5},
    ),
    ({"zero_gamma": 0.5}, {}, BASE),  # a setting of a row left off: checked, not recorded
    ({"tda": True}, {"methods": ["tda"]}, {**BASE, "tda": True, "tda_orders": [1, 2, 3]}),
    (
        {"tda": True, "tda_orders": [4]},
        {"methods": [{"tda": {"orders": [4]}}]},
        {**BASE, "tda": True, "tda_orders": [4]},
    ),
    ({"tda_orders": [7, 8]}, {}, BASE),
    (  # experiments/tta_rn50.yaml
        RN50,
        {"views": 64, "ratio": 0.1, "steps": 1, "lr": 1e-4, "train_on": "imagenet", "methods": ["tpt", "ensemble"]},
        {**BASE, "tpt": True, "ensemble": True, "train_on": "imagenet"},
    ),
    (  # experiments/tta_vitb16.yaml
        VITB16,
        {"train_on": "imagenet", "methods": ["zeroshot", "tpt", "zero", {"tda": {"orders": [1, 2, 3, 4, 5]}}]},
        {
            **BASE,
            **{"tpt": True, "train_on": "imagenet", "zeroshot": True, "zero": True, "zero_gamma": 0.3},
            **{"tda": True, "tda_orders": [1, 2, 3, 4, 5]},
        },
    ),
    (
        {**EVERY, **EVERY_SET},
        {**EVERY_SET, "methods": ["tpt", "zero", {"tda": {"orders": [1, 2, 3]}}, "ensemble", "zeroshot"]},
        {
            **BASE,
            **{"ratio": 0.25, "steps": 2, "lr": 0.01, "seed": 3, "max_images": 100, "tpt": True, "ensemble": True},
            **{"zeroshot": True, "zero": True, "zero_gamma": 0.3, "tda": True, "tda_orders": [1, 2, 3]},
        },
    ),
]


def _tta(section: dict):
    raw = {"datasets": ["dtd"], "methods": ["zeroshot"], "protocol": "tta", "tta": section}
    return parse_experiment(raw, "t.yaml").tta


@pytest.mark.parametrize("flags, listed, expected", SETTINGS)
def test_a_tta_cell_records_the_setting_older_versions_recorded(flags, listed, expected):
    assert _tta(flags).setting() == expected
    assert _tta(listed).setting() == expected


def test_a_setting_restated_at_its_default_is_the_same_cell_and_a_changed_one_is_recorded():
    assert _tta({"methods": [{"tpt": {"lr": 5e-3, "ctx_init": "a photo of a"}}]}).setting() == {**BASE, "tpt": True}
    changed = _tta({"methods": [{"tpt": {"lr": 1e-3}}, {"ensemble": {"ratio": 0.5}}]}).setting()
    assert changed == {**BASE, "tpt": True, "ensemble": True, "tpt_lr": 1e-3, "ensemble_ratio": 0.5}


# (the tta section with the older flags, as a methods list, and per cell: label, method, shots, seed and the cell id
# with the backbone's fingerprint and the hyperparameters held fixed, so only what a test-time change can move counts)
CELLS = [
    (
        {"views": 3, "max_images": 6, "ensemble": True},
        {"views": 3, "max_images": 6, "methods": ["ensemble"]},
        [
            ("tta+zeroshot", "zeroshot", 0, None, "0deaaa9cd7a2948037b97436"),
            ("tta+prolip", "prolip", 1, 1, "eea267e42bce05bfaba31f27"),
            ("tta+prolip", "prolip", 2, 1, "e7f4bc2fef329c249c5ae063"),
            ("ensemble", "zeroshot", 0, None, "f7efe5afde4e4cc83f6947ca"),
        ],
    ),
    (
        {"views": 4, "max_images": 8, "zeroshot": True, "zero": True, "tda": True, "tda_orders": [1, 2, 5]},
        {"views": 4, "max_images": 8, "methods": ["zeroshot", "zero", {"tda": {"orders": [1, 2, 5]}}]},
        [
            ("tta+zeroshot", "zeroshot", 0, None, "69679b6ccabc1d781b67b01d"),
            ("tta+prolip", "prolip", 1, 1, "6a8ec5a603261d16426732c3"),
            ("tta+prolip", "prolip", 2, 1, "2a41d63d6d42e9c6402db2d6"),
            ("zeroshot", "zeroshot", 0, None, "18ded5831183f5819dbc0e58"),
            ("zero", "zeroshot", 0, None, "e29e629bc3bc4a2726cf8901"),
            ("tda", "zeroshot", 0, None, "a84eda47cd9adc8928644fbf"),
        ],
    ),
    (
        {"views": 4, "tpt": True, "zero": True, "zero_gamma": 0.5, "tda_orders": [9]},
        {"views": 4, "methods": [{"zero": {"gamma": 0.5}}, "tpt"]},
        [
            ("tta+zeroshot", "zeroshot", 0, None, "b8f9140da44e295507f0d519"),
            ("tta+prolip", "prolip", 1, 1, "105900325fc4104ba66323d1"),
            ("tta+prolip", "prolip", 2, 1, "35553271e4c1da05ceaaa176"),
            ("tpt", "zeroshot", 0, None, "a2e799b3d7b1197951d23fd5"),
            ("zero", "zeroshot", 0, None, "2346116f254aee4aa1df30b1"),
        ],
    ),
    (
        {**VITB16, "train_on": None},
        {"methods": ["tpt", "zeroshot", "zero", {"tda": {"orders": [1, 2, 3, 4, 5]}}]},
        [
            ("tta+zeroshot", "zeroshot", 0, None, "f1fbeefcd35a9e8bc21f6ad6"),
            ("tta+prolip", "prolip", 1, 1, "2b6e9d12c01cee2f3b653dbc"),
            ("tta+prolip", "prolip", 2, 1, "b10d63fba9e9ef4f261b7031"),
            ("zeroshot", "zeroshot", 0, None, "a12f98d97b03359c742334e7"),
            ("tpt", "zeroshot", 0, None, "38ae50d9fccf99235abc5c54"),
            ("zero", "zeroshot", 0, None, "dbb6a5dcffc0d2bda12dc0a7"),
            ("tda", "zeroshot", 0, None, "aabb57731dcf173f6e74b281"),
        ],
    ),
]


def _cells(tiny_vit, dtd10_experiment, section: dict) -> list[tuple]:
    from prolip.bench.protocols import Bench, TestTime

    raw = dtd10_experiment(
        protocol="tta", shots=[1, 2], methods=["zeroshot", {"name": "prolip", "steps": 3}], tta=section
    )
    b = Bench(parse_experiment(raw, "t.yaml"), echo=lambda _: None, backbone=tiny_vit)
    records = [c.record for g in TestTime(b).groups() for c in g.cells]
    fixed = {"fingerprint": "pinned", "hyperparameters": "pinned"}
    return [(r["label"], r["method"], r["shots"], r["seed"], cell_id({**r, **fixed})) for r in records]


@pytest.mark.parametrize("flags, listed, expected", CELLS)
def test_tta_cells_keep_the_labels_methods_and_ids_older_versions_wrote(
    tiny_vit, dtd10_experiment, flags, listed, expected
):
    assert _cells(tiny_vit, dtd10_experiment, flags) == expected  # the same cells, in the same order
    assert sorted(_cells(tiny_vit, dtd10_experiment, listed)) == sorted(expected)
