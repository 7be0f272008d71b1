"""Loading weights: local files offline, fast clear failures, refusing pickles that would run code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from prolip.backbones import BackboneLoadError, available_models, load_backbone
from prolip.backbones.loading import read_state_dict


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_local_safetensors_loads_offline(tiny_vit_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_backbone("test-vit-tiny", str(tiny_vit_file))
    assert not backbone.info.random_weights and backbone.info.weights == str(tiny_vit_file)
    torch.testing.assert_close(backbone.projection().weight, load_file(str(tiny_vit_file))["visual.proj"])


def test_pt_state_dict_with_wrapper_and_module_prefix(tiny_vit_file, tmp_path):
    state = load_file(str(tiny_vit_file))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    a = load_backbone("test-vit-tiny", str(wrapped))
    b = load_backbone("test-vit-tiny", str(tiny_vit_file))
    assert a.info.fingerprint == b.info.fingerprint


def test_openai_style_extra_keys_are_ignored(tiny_vit_file, tmp_path):
    state = load_file(str(tiny_vit_file))
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "openai_style.pt")
    assert "input_resolution" not in read_state_dict(tmp_path / "openai_style.pt")
    load_backbone("test-vit-tiny", str(tmp_path / "openai_style.pt"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode(marker)}, evil)
    with pytest.raises(BackboneLoadError, match="refusing to load .*evil.pt"):
        load_backbone("test-vit-tiny", str(evil))
    assert not marker.exists()


def test_unreachable_pretrained_tag_fails_fast_with_fix(tmp_path):
    # A fresh process, so HF_HUB_OFFLINE is seen exactly as a user's shell would set it.
    # Only the call is timed, not the imports (torch and open_clip take seconds on a busy machine): a download
    # attempt would hang for minutes, failing fast takes well under one.
    code = (
        "import time\nfrom prolip.backbones import load_backbone, BackboneLoadError\n"
        "start = time.monotonic()\n"
        "try:\n    load_backbone('ViT-B-16', 'openai')\n"
        "except BackboneLoadError as e:\n    print('ERROR', e)\n"
        "print('SECONDS', time.monotonic() - start)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert "ERROR" in out.stdout, out.stderr
    assert "--pretrained /path/to/weights.safetensors" in out.stdout and "offline" in out.stdout
    assert float(out.stdout.split("SECONDS")[1]) < 30


@pytest.mark.parametrize(
    "model,pretrained,message",
    [
        ("ViT-Q-99", "none", "unknown model 'ViT-Q-99'"),
        ("RN50", "not-a-tag", "unknown pretrained tag 'not-a-tag' for RN50"),
        ("test-vit-tiny", "/nonexistent/weights.safetensors", "does not exist"),
    ],
)
def test_bad_arguments_name_the_culprit(model, pretrained, message):
    with pytest.raises(BackboneLoadError, match=message):
        load_backbone(model, pretrained)


def test_checkpoint_for_another_architecture_is_explained(tiny_vit_file):
    with pytest.raises(BackboneLoadError, match="tiny_vit.safetensors do not match the architecture"):
        load_backbone("test-rn-tiny", str(tiny_vit_file))


def test_corrupt_safetensors_is_explained(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(BackboneLoadError, match="bad.safetensors"):
        load_backbone("test-vit-tiny", str(bad))


def test_hf_dir_with_stub_tokenizer_is_refused(tiny_hf_dir, tmp_path):
    from transformers import CLIPTokenizer

    broken = tmp_path / "broken"
    shutil.copytree(
        tiny_hf_dir,
        broken,
        ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "bpe"),
    )
    CLIPTokenizer().save_pretrained(broken)  # what transformers builds when the vocabulary files are missing
    with pytest.raises(BackboneLoadError, match="tokenizer .* only .* tokens"):
        load_backbone(f"hf:{broken}")


def test_hf_hub_id_offline_fails_with_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneLoadError, match="local save_pretrained directory"):
        load_backbone("hf:openai/clip-vit-base-patch16")


def test_available_models_lists_every_open_clip_architecture():
    import open_clip

    models = available_models()
    assert {"ViT-B-16", "RN50", "test-vit-tiny", "test-rn-tiny", "coca_ViT-B-32", "EVA02-B-16"} <= set(models)
    assert set(models) == set(open_clip.list_models())


def test_a_tower_without_native_site_is_refused_there_and_offered_the_output_site():
    # a timm trunk under open_clip's rotary attention pool, with no projection: no linear map prolip adapts ends it
    with pytest.raises(
        BackboneLoadError, match="test-attnpool-tiny: its image tower .* no native projection site.*site='output'"
    ):
        load_backbone("test-attnpool-tiny", "none")
    with pytest.raises(BackboneLoadError, match="unknown site 'middle'"):
        load_backbone("test-vit-tiny", "none", site="middle")
