"""Inputs where prolip would have to guess are refused, with the choice spelled out and the option that makes it.

A Hugging Face dataset with two ClassLabel columns (fine and coarse labels, say) is one: read with either, the same
images train a different classifier, so neither is taken without a word, not even the one named ``label``.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from prolip.data import DataError, resolve_data

from .conftest import TINY, cli

pytestmark = pytest.mark.reliability("ambiguity")

FINE, COARSE = ("cat", "dog", "fox", "owl"), ("mammal", "bird")


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def two_label_columns(tmp_path_factory):
    """A DatasetDict saved to disk whose rows carry two ClassLabel columns, under the names given."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("ambiguous")

    def save(fine: str, coarse: str):
        fine_labels = [i % 4 for i in range(8)]
        rows = {
            "image": [{"bytes": png(i), "path": None} for i in range(8)],
            fine: fine_labels,
            coarse: [0 if y < 3 else 1 for y in fine_labels],
        }
        features = datasets.Features(
            {
                "image": datasets.Image(),
                fine: datasets.ClassLabel(names=list(FINE)),
                coarse: datasets.ClassLabel(names=list(COARSE)),
            }
        )
        out = root / f"{fine}-{coarse}"
        ds = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(out))
        return out

    return save


NAMINGS = [("label", "coarse_label"), ("fine_label", "coarse_label"), ("coarse_label", "label")]


@pytest.mark.parametrize(("fine", "coarse"), NAMINGS, ids=["-".join(n) for n in NAMINGS])
def test_two_classlabel_columns_are_refused_naming_both_and_label_key(two_label_columns, fine, coarse, tally):
    root = two_label_columns(fine, coarse)
    with tally.raises(
        DataError,
        match=rf"2 ClassLabel columns \({fine}, {coarse}\).*--label-key {fine} or --label-key {coarse}",
        input=f"two ClassLabel columns: {fine}, {coarse}",
    ) as info:
        resolve_data(f"hf:{root}")
    assert info.value.option == "--label-key"
    # Named, each column is read as asked, with its own class names.
    assert resolve_data(f"hf:{root}", label_key=fine).classnames == list(FINE)
    assert resolve_data(f"hf:{root}", label_key=coarse).classnames == list(COARSE)
    tally.handled_ok(f"--label-key picks {fine} or {coarse}")


def test_the_cli_refuses_in_one_line_before_any_work(two_label_columns, tmp_path, tally):
    root = two_label_columns("label", "coarse_label")
    r = cli("fit", "--data", f"hf:{root}", "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", *TINY)
    output = tally.cli_error(
        r,
        re.escape("2 ClassLabel columns (label, coarse_label)"),
        re.escape("--label-key label or --label-key coarse_label"),
        input="fit on a dataset with two ClassLabel columns",
    )
    assert len([line for line in output.splitlines() if line.startswith("Error:")]) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
