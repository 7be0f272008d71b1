"""Saved run directories: round trip, atomic writes, no silent overwrite."""

import json

import pytest
import torch

from prolip.run import Run, RunError

MANIFEST = {
    "backbone": {
        "family": "open_clip",
        "arch": "test-vit-tiny",
        "weights": "none",
        "random_weights": True,
        "fingerprint": "f" * 64,
    },
    "method": {"method": "prolip", "hyperparameters": {"lr": 1e-5}},
    "fit": {"shots": 4},
    "logit_scale": 100.0,
}


def _run():
    return Run(
        manifest=json.loads(json.dumps(MANIFEST)),
        method_state={"W": torch.randn(6, 4)},
        classifier=torch.randn(3, 4),
        classnames=["a", "b", "c"],
        templates=["a photo of a {}."],
    )


def test_round_trip(tmp_path):
    run = _run()
    run.save(tmp_path / "r")
    back = Run.load(tmp_path / "r")
    assert torch.equal(back.method_state["W"], run.method_state["W"])
    assert torch.equal(back.classifier, run.classifier)
    assert back.classnames == ["a", "b", "c"] and back.templates == run.templates
    assert back.method_name == "prolip"
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["format"] == "prolip-run/1"


def test_refuses_to_overwrite_without_force(tmp_path):
    _run().save(tmp_path / "r")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        _run().save(tmp_path / "r")
    other = _run()
    other.save(tmp_path / "r", force=True)
    assert torch.equal(Run.load(tmp_path / "r").method_state["W"], other.method_state["W"])


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import prolip.run as run_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        _run().save(tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_run(tmp_path, monkeypatch):
    first = _run()
    first.save(tmp_path / "r")
    import prolip.run as run_mod

    monkeypatch.setattr(run_mod, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _run().save(tmp_path / "r", force=True)
    assert torch.equal(Run.load(tmp_path / "r").method_state["W"], first.method_state["W"])
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        Run.load(tmp_path / "missing")
    _run().save(tmp_path / "r")
    (tmp_path / "r" / "method.safetensors").unlink()
    with pytest.raises(RunError, match="method.safetensors is missing"):
        Run.load(tmp_path / "r")
