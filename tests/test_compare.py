"""Results that travel: a bench on a copied dataset gives the same records (numbers and image fingerprints) with no
re-extraction, and `prolip report --compare A B` says so, names a folder that used other images, and shows a
changed number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prolip.bench.compare import AGREE, DIFFERS, ONLY_A, OTHER_IMAGES, OTHER_WEIGHTS, compare_records
from prolip.cli import main
from test_content_identity import copy_with_new_times, write_source

# Where a record says when and how long, or names the draw by path: the rest must be equal across copies.
WHERE_AND_WHEN = {"created", "seconds", "peak_memory_mb", "memory_measure", "support_digest"}


def bench(experiment: Path, data: str, out: Path, cache: Path):
    experiment.write_text(
        f"datasets: ['{data}']\nmodel: test-vit-tiny\npretrained: none\nshots: [1]\nseeds: [1]\nviews: 1\n"
        f"cache_dir: {cache}\nmethods: [zeroshot, {{name: prolip, steps: 3}}]\n"
    )
    return CliRunner().invoke(main, ["bench", str(experiment), "--out", str(out)])


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def compare(a: Path, b: Path, *extra: str):
    return CliRunner().invoke(main, ["report", "--compare", str(a), str(b), *extra])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    data_a = write_source("folder", root / "a" / "data")
    r = bench(root / "a.yaml", data_a, root / "res_a", root / "cache")
    assert r.exit_code == 0, r.output
    copy_with_new_times(root / "a", root / "b")
    units = sorted((root / "cache").rglob("*.safetensors"))
    r = bench(root / "b.yaml", data_a.replace(str(root / "a"), str(root / "b")), root / "res_b", root / "cache")
    assert r.exit_code == 0, r.output
    assert sorted((root / "cache").rglob("*.safetensors")) == units  # nothing extracted for the copy
    # Other images: one pixel of one image changed, at a third path.
    copy_with_new_times(root / "a", root / "c")
    first = sorted((root / "c").rglob("*.png"))[0]
    pixels = np.array(Image.open(first))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(first)
    r = bench(root / "c.yaml", data_a.replace(str(root / "a"), str(root / "c")), root / "res_c", root / "cache")
    assert r.exit_code == 0, r.output
    return {"a": root / "res_a", "b": root / "res_b", "c": root / "res_c", "root": root}


def test_a_copied_dataset_gives_the_same_bench_records_without_extraction(results):
    a, b = records(results["a"]), records(results["b"])
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k not in WHERE_AND_WHEN} == {
            k: v for k, v in y.items() if k not in WHERE_AND_WHEN
        }
        assert set(x["images"]) == {"support", "validation", "evaluation"}
        assert {"prolip", "torch", "device", "dtype", "threads", "fingerprint"} <= set(x["environment"])


def test_compare_says_two_folders_agree(results):
    r = compare(results["a"], results["b"])
    assert r.exit_code == 0, r.output
    assert "2 cells: 2 agree, 0 numbers differ, 0 other images" in r.output


def test_compare_names_a_folder_that_used_other_images(results):
    r = compare(results["a"], results["c"])
    assert r.exit_code == 1, r.output
    assert "other images" in r.output and "images differ" in r.output
    assert "2 other images" in r.output


def test_compare_shows_a_changed_number_beyond_the_tolerance(results, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(results["b"], changed)
    rows = records(changed)
    rows[1]["accuracy"] += 0.5
    (changed / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = compare(results["a"], changed)
    assert r.exit_code == 1, r.output
    line = next(x for x in r.output.splitlines() if x.strip().startswith(DIFFERS))
    assert rows[1]["label"] in line and "accuracy" in line
    assert compare(results["a"], changed, "--tolerance", "0.6").exit_code == 0


def test_compare_records_verdicts_by_hand():
    base = {"protocol": "fewshot", "dataset": "d", "label": "m", "method": "m", "shots": 1, "seed": 1}
    a = [
        {**base, "fingerprint": "w", "images": {"support": "s"}, "accuracy": 50.0, "ece": 0.1},
        {**base, "seed": 2, "fingerprint": "w", "accuracy": 40.0},
        {**base, "seed": 3, "fingerprint": "w", "accuracy": 30.0},
    ]
    b = [
        {**base, "fingerprint": "w", "images": {"support": "s"}, "accuracy": 50.0, "ece": 0.3},
        {**base, "seed": 2, "fingerprint": "v", "accuracy": 40.0},
    ]
    result = compare_records(a, b, ["accuracy"], tolerance=0.01)
    assert [c.verdict for c in result.cells] == [DIFFERS, OTHER_WEIGHTS, ONLY_A]
    assert result.cells[0].differences == {"ece": (0.1, 0.3)}
    assert compare_records(a[:1], a[:1], ["accuracy"]).cells[0].verdict == AGREE
    changed = [{**a[0], "images": {"support": "t"}}]
    assert compare_records(a[:1], changed, ["accuracy"]).cells[0].verdict == OTHER_IMAGES
    with pytest.raises(ValueError, match="tolerance"):
        compare_records(a, b, ["accuracy"], tolerance=-1)


def test_records_carry_calibration_and_the_report_shows_it_beside_accuracy_and_cost(results, tmp_path):
    for r in records(results["a"]):
        assert 0.0 <= r["ece"] <= 100.0 and r["accuracy"] is not None
    out = CliRunner().invoke(main, ["report", str(results["a"]), "--out", str(tmp_path / "report")])
    assert out.exit_code == 0, out.output
    header = "| method | shots | accuracy | ECE | seconds | forward passes | peak memory | trainable parameters |"
    assert header in out.output


@pytest.mark.parametrize("kind", ["tar", "hf"])
def test_copied_shards_and_datasets_give_the_same_bench_records_without_extraction(kind, tmp_path):
    """As a folder (above): tar shards and a Hugging Face dataset copied with new modification times."""
    spec_a = write_source(kind, tmp_path / "a" / "data")
    r = bench(tmp_path / "a.yaml", spec_a, tmp_path / "res_a", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    copy_with_new_times(tmp_path / "a", tmp_path / "b")
    units = sorted((tmp_path / "cache").rglob("*.safetensors"))
    spec_b = spec_a.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    r = bench(tmp_path / "b.yaml", spec_b, tmp_path / "res_b", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == units
    for x, y in zip(records(tmp_path / "res_a"), records(tmp_path / "res_b"), strict=True):
        assert {k: v for k, v in x.items() if k not in WHERE_AND_WHEN} == {
            k: v for k, v in y.items() if k not in WHERE_AND_WHEN
        }
    assert compare(tmp_path / "res_a", tmp_path / "res_b").exit_code == 0
