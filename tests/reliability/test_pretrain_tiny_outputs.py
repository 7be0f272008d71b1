"""`prolip pretrain-tiny --out DIR` follows the rule every writer does: it never replaces a file it did not write,
replaces its own only with --force, and refuses an --out it cannot write before any training."""

from __future__ import annotations

import re

import pytest

from .conftest import cli, digest

pytestmark = pytest.mark.reliability("output")

WEIGHTS = "prolip-tiny-vit.safetensors"


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training starts: every case here must be refused before it."""
    import prolip.tiny

    def pretrain(*a, **k):
        raise AssertionError("training started before the refusal")

    monkeypatch.setattr(prolip.tiny, "pretrain", pretrain)


def _safetensors_of_the_user(path):
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"visual.proj": torch.ones(4, 4)}, str(path), metadata={"note": "my own fine-tuned weights"})
    return path


def _text_of_the_user(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("my notes")
    return path


USER_FILES = {"the user's own safetensors": _safetensors_of_the_user, "a text file": _text_of_the_user}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
@pytest.mark.parametrize("what", list(USER_FILES))
def test_a_weights_file_the_user_put_there_is_never_replaced(tmp_path, what, force, no_training, tally):
    target = USER_FILES[what](tmp_path / "out" / WEIGHTS)
    before = digest(tmp_path)
    r = cli("pretrain-tiny", "--out", tmp_path / "out", "--steps", "1", *(["--force"] if force else []))
    tally.cli_error(
        r,
        re.escape(f"will not overwrite {target}: prolip did not write it"),
        input=f"pretrain-tiny over {what}" + (" --force" if force else ""),
    )
    assert "pretraining" not in r.output
    assert tally.lost(int(digest(tmp_path) != before)) == 0


@pytest.mark.parametrize("out", ["a plain file", "a path under a plain file"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_training(tmp_path, out, no_training, tally):
    plain = tmp_path / "plainfile"
    plain.write_text("not a folder")
    target = plain if out == "a plain file" else plain / "deeper"
    before = digest(tmp_path)
    r = cli("pretrain-tiny", "--out", target, "--steps", "1")
    tally.cli_error(r, re.escape(f"{plain} is a file, not a folder"), input=f"pretrain-tiny --out {out}")
    assert "pretraining" not in r.output and "Traceback" not in r.output
    assert tally.lost(int(digest(tmp_path) != before)) == 0


def test_its_own_weights_are_replaced_only_with_force(tmp_path, monkeypatch, tally):
    import prolip.tiny

    state = prolip.tiny.pretrain(prolip.tiny.PretrainConfig(steps=1))
    r = cli("pretrain-tiny", "--out", tmp_path, "--steps", "1")
    assert r.exit_code == 0, r.output
    before = digest(tmp_path)
    monkeypatch.setattr(prolip.tiny, "pretrain", lambda *a, **k: pytest.fail("trained before refusing"))
    r = cli("pretrain-tiny", "--out", tmp_path, "--steps", "1", "--seed", "1")
    tally.cli_error(r, re.escape(f"{tmp_path / WEIGHTS} already exists"), "--force", input="pretrain-tiny twice")
    assert tally.lost(int(digest(tmp_path) != before)) == 0
    monkeypatch.setattr(prolip.tiny, "pretrain", lambda *a, **k: state)
    r = cli("pretrain-tiny", "--out", tmp_path, "--steps", "1", "--seed", "1", "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS]  # replaced in place, nothing left beside it
    tally.handled_ok("pretrain-tiny --force over its own weights")
