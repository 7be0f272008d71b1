"""Results a user can act on: per-class numbers against a hand-computed example, the eval outputs (JSON, CSV, PNG),
the run card and its copy beside an export, and the report's per-dataset tables and gain figure."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from prolip import diagnostics as d
from prolip import runcard
from prolip.outputs import kind_of

TINY = ["--model", "test-vit-tiny", "--pretrained", "none"]

# Nine images of classes 0-2 (class 3 has none). Predictions, and the runner-up class of each image:
#   class 0: predicted 0, 1, 0 (2 of 3 right)   runner-up 1, 0, 2
#   class 1: predicted 2, 2    (0 of 2)         runner-up 1, 0
#   class 2: predicted 2, 2, 0, 2 (3 of 4)      runner-up 0, 1, 3, 3
LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDICTED = [0, 1, 0, 2, 2, 2, 2, 0, 2]
RUNNER_UP = [1, 0, 2, 1, 0, 0, 1, 3, 3]
NAMES = ["ant", "bee", "cat", "dog"]


def hand_logits() -> torch.Tensor:
    logits = torch.zeros(len(LABELS), 4)
    for i, (p, r) in enumerate(zip(PREDICTED, RUNNER_UP, strict=True)):
        logits[i, p], logits[i, r] = 3.0, 2.0
    return logits


def test_per_class_numbers_match_the_hand_computed_example():
    confusion = d.confusion_matrix(PREDICTED, LABELS, 4)
    assert confusion == [[2, 1, 0, 0], [0, 0, 2, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    rows = d.per_class(confusion, NAMES)
    assert [r.accuracy for r in rows] == [pytest.approx(200 / 3), 0.0, 75.0, None]
    assert [(r.confused_with, r.confused_count) for r in rows] == [("bee", 1), ("cat", 2), ("ant", 1), (None, 0)]
    assert d.mean_per_class_accuracy(rows) == pytest.approx((200 / 3 + 0 + 75) / 3)  # the empty class is left out
    assert [r.name for r in d.worst_classes(rows)] == ["bee", "ant", "cat"]
    assert d.most_confused(confusion, NAMES) == [
        {"true": "bee", "predicted": "cat", "count": 2, "share": 100.0},
        {"true": "ant", "predicted": "bee", "count": 1, "share": pytest.approx(100 / 3)},
        {"true": "cat", "predicted": "ant", "count": 1, "share": 25.0},
    ]
    logits = hand_logits()
    assert d.topk_accuracy(logits, LABELS, 1) == pytest.approx(500 / 9)
    assert d.topk_accuracy(logits, LABELS, 2) == pytest.approx(700 / 9)  # images 4 and 7 miss even at k=2
    assert d.topk_accuracy(logits, LABELS, 5) is None  # 4 classes: top-5 would be 100% by construction


def test_diagnose_gathers_everything_json_ready_and_prints_two_lines():
    report = d.diagnose(hand_logits(), LABELS, NAMES)
    assert report["accuracy"] == pytest.approx(500 / 9) and report["top5_accuracy"] is None
    assert report["confusion_matrix"][1] == [0, 0, 2, 0] and report["per_class"][3]["images"] == 0
    assert json.loads(json.dumps(report)) == report
    worst, confused = d.summary_lines(report)
    assert worst.startswith("worst classes: bee 0.0% (0/2), ant 66.7% (2/3)")
    assert confused.startswith("most confused (true → predicted): bee → cat 2× (100% of bee)")
    with pytest.raises(ValueError, match="0..3"):
        d.confusion_matrix([4], [0], 4)


def _planted(num_classes: int, per_class: int = 20) -> dict:
    """Right 60% of the time; every 7th class taken for the next one half the time."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    logits = torch.randn(len(labels), num_classes, generator=g)
    logits[torch.arange(len(labels)), labels] += 2.0
    for a in range(0, num_classes, 7):
        idx = (labels == a).nonzero()[: per_class // 2, 0]
        logits[idx, (a + 1) % num_classes] += 6.0
    return d.diagnose(logits, labels, [f"class {i}" for i in range(num_classes)])


def test_the_picture_shows_all_classes_when_few_and_the_top_confusions_side_by_side_when_many():
    few, many = _planted(10), _planted(100)
    assert d.pictured_classes(few["confusion_matrix"]) == list(range(10))
    shown = d.pictured_classes(many["confusion_matrix"])
    assert 2 <= len(shown) <= 2 * d.PICTURED_PAIRS
    first = many["most_confused"][0]
    i, j = (int(first[k].split()[1]) for k in ("true", "predicted"))
    assert shown[:2] == [i, j]  # the largest confusion's two classes first, next to each other


@pytest.mark.parametrize("num_classes", [10, 100])
def test_eval_files_are_a_per_class_csv_and_a_readable_png(num_classes, tmp_path):
    report = _planted(num_classes)
    written = d.write_eval_files(report, tmp_path, title="planted")
    assert [p.name for p in written] == ["per_class.csv", "confusion_matrix.png"]
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert len(rows) == num_classes and rows[0].keys() >= {"name", "images", "correct", "accuracy", "confused_with"}
    assert float(rows[0]["accuracy"]) == pytest.approx(report["per_class"][0]["accuracy"], abs=0.01)
    with Image.open(tmp_path / "confusion_matrix.png") as im:
        assert 500 < im.width < 2600 and 400 < im.height < 2000  # legible at 130 dpi, not a poster


def _manifest(random_weights=True, command=None) -> dict:
    return {
        "prolip_version": "0.1.0",
        "created": "now",
        "backbone": {
            "family": "open_clip",
            "arch": "RN50",
            "weights": "openai",
            "random_weights": random_weights,
            "fingerprint": "ab" * 32,
        },
        "method": {
            "method": "prolip",
            "hyperparameters": {"lr": 1e-5, "lam": "1/N", "steps": 300},
            "selected": {"lr": 1e-3, "lam": 0.01, "how": "validation", "val_accuracy": 70.0},
        },
        "fit": {
            "shots": 4,
            "seed": 2,
            "sampler": "lpp",
            "views": 300,
            "aug_seed": 0,
            "use_validation": True,
            "hyperparameters": {"steps": 300},
        },
        "data": {
            "spec": "shards/train-{0..9}.tar",
            "name": "shards",
            "num_classes": 3,
            "train_images": 120,
            "support": [["a", 0]] * 12,
            "validation": [["b", 0]] * 12,
            "eval_set": "held-out images",
            "augmentation": "prolip",
        },
        "metrics": {
            "accuracy": 80.0,
            "zero_shot_accuracy": 60.0,
            "eval_images": 96,
            "top5_accuracy": None,
            "mean_per_class_accuracy": 78.5,
            "worst_classes": [{"class": "cat", "accuracy": 50.0}],
            "most_confused": [{"true": "cat", "predicted": "dog", "count": 7, "share": 21.9}],
        },
    }


def test_the_run_card_says_what_was_adapted_on_what_how_and_how_well():
    card = runcard.render(_manifest(), "cd /x && prolip fit --data 'shards/train-{0..9}.tar' --validate")
    assert "RANDOM weights" in card and "`--data shards/train-{0..9}.tar`" in card and "120 training images" in card
    assert "4 shots per class (12 support images), seed 2, sampler `lpp`" in card
    assert "| lr | `0.001` | selected on the N-shot validation set (from default `1e-05`) |" in card
    assert "| steps | `300` | given (--hp) |" in card and "val_accuracy = `70.0`" in card
    assert "| adapted | 80.00% (+20.00) |" in card and "| cat | dog | 7 | 22% |" in card
    assert "prolip fit --data 'shards/train-{0..9}.tar' --validate" in card
    assert "Python API" in runcard.render(_manifest(random_weights=False)) and "RANDOM" not in runcard.render(
        _manifest(random_weights=False)
    )
    assert runcard.command_line(["fit", "--data", "my data"]).endswith("prolip fit --data 'my data'")


def cli(*args):
    from prolip.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def test_fit_writes_the_card_eval_writes_its_files_export_copies_the_card(tiny_image_folder, tmp_path):
    from prolip.run import Run

    cache, run = tmp_path / "cache", tmp_path / "run"
    r = cli(
        "fit",
        "--data",
        tiny_image_folder,
        "--shots",
        2,
        "--views",
        2,
        "--steps",
        20,
        "--cache-dir",
        cache,
        "--out",
        run,
        *TINY,
    )
    assert r.exit_code == 0, r.output
    assert kind_of(run) == "run" and "## Reproduce" in Run.load(run).card
    r = cli("eval", run, "--data", tiny_image_folder, "--cache-dir", cache, "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    assert "top-5 n/a" in r.stdout and "worst classes:" in r.stdout and "most confused" in r.stdout
    assert kind_of(tmp_path / "ev") == "eval"
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert sum(r["images"] for r in report["per_class"]) == report["eval_images"] == 16
    r = cli("eval", run, "--data", tiny_image_folder, "--cache-dir", cache, "--out", tmp_path / "ev")
    assert r.exit_code != 0 and "--force" in r.output
    assert (
        cli(
            "eval", run, "--data", tiny_image_folder, "--cache-dir", cache, "--out", tmp_path / "ev", "--force"
        ).exit_code
        == 0
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = cli("eval", run, "--data", tiny_image_folder, "--cache-dir", cache, "--out", tmp_path / "mine", "--force")
    assert r.exit_code != 0 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    r = cli("export", run, "--out", tmp_path / "export")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "export" / "README.md").read_text() == (run / "README.md").read_text()
    assert "README.md" in json.loads((tmp_path / "export" / "prolip-export.json").read_text())["files"]
    assert kind_of(tmp_path / "export") == "export"


def test_the_report_has_per_dataset_tables_and_a_gain_figure(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from prolip.bench.report import aggregate, write_report, zero_shot_gains
    from test_report import rec

    records = []
    for i, dataset in enumerate(["dtd", "eurosat"]):
        for seed in (1, 2):
            for shots in (1, 16):
                records.append(rec(dataset, seed, 50.0 + i, method="zeroshot", label="zeroshot", hp={}, shots=shots))
                records.append(rec(dataset, seed, 52.0 + i + shots / 2 + seed, shots=shots, label="prolip"))
    paths = write_report(records, tmp_path)
    markdown = paths["markdown"].read_text()
    table = markdown[markdown.index("### eurosat") :]
    # eurosat: zero-shot 51; prolip 1-shot (54.5 + 55.5) / 2 = 55, 16-shot (62 + 63) / 2 = 62.5
    assert "| prolip | 55.00 ± 0.50 (+4.00) | 62.50 ± 0.50 (+11.50) |" in table
    assert sorted(round(g["gain"], 2) for g in zero_shot_gains(aggregate(records))) == [4.0, 4.0, 11.5, 11.5]
    with Image.open(paths["gain"]) as im:
        assert im.width > 300


def test_expected_calibration_error_against_a_hand_computed_example():
    import math

    from prolip.functional import expected_calibration_error

    # Two classes; top-1 confidences 0.9, 0.9, 0.58, 0.55 (bins (13/15, 14/15] and (8/15, 9/15]):
    # bin of 0.9: two images, one right → |0.5 − 0.9| · 2; bin of 0.58 and 0.55: both right → |1 − 0.565| · 2.
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.42, 0.58], [0.55, 0.45]])
    logits = p.log()
    labels = torch.tensor([0, 1, 1, 0])
    expected = (abs(0.5 - 0.9) * 2 + abs(1 - 0.565) * 2) / 4 * 100
    assert math.isclose(expected_calibration_error(logits, labels), expected, rel_tol=1e-5)
    assert expected_calibration_error(logits, labels, bins=1) == pytest.approx(abs(0.75 - 0.7325) * 100, rel=1e-4)
    perfect = torch.tensor([[20.0, -20.0], [-20.0, 20.0]])  # confident and right: no gap
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-4)
