"""Exports merge the adapted W into a standard checkpoint that open_clip / transformers load as-is."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from prolip.export import export_hf, export_open_clip, load_classifier_head, save_classifier_head
from prolip.functional import clip_logits

CLASSES = ["cat", "dog", "car", "tree"]
TEMPLATES = ["a photo of a {}."]


def _adapted(backbone, seed=0):
    W0 = backbone.projection().weight
    return W0 + 0.05 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(seed))


def _images(backbone, n=3):
    s = backbone.preprocessing.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
def test_open_clip_export_round_trip(fixture, request, tmp_path):
    backbone = request.getfixturevalue(fixture)
    W = _adapted(backbone)
    path = export_open_clip(backbone, W, tmp_path / "model.safetensors")

    exported, original = load_file(str(path)), backbone.model.state_dict()
    assert exported.keys() == original.keys()
    site = backbone.projection()
    changed = [k for k in exported if not torch.equal(exported[k], original[k])]
    assert changed == [site.param_name]
    torch.testing.assert_close(site.from_native(exported[site.param_name], site.native_layout), W)

    reloaded = open_clip.create_model(backbone.info.arch, pretrained=str(path)).eval()
    images = _images(backbone)
    T = backbone.encode_text(CLASSES, TEMPLATES)
    expected = clip_logits(backbone.encode_pre(images), W, site.bias, T, backbone.logit_scale)
    with torch.no_grad():
        got = reloaded.logit_scale.exp() * reloaded.encode_image(images, normalize=True) @ T.T
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_hf_export_round_trip(tiny_hf, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    W = _adapted(tiny_hf)
    out = export_hf(tiny_hf, W, tmp_path / "hf")
    reloaded = CLIPModel.from_pretrained(out, local_files_only=True).eval()
    assert len(AutoTokenizer.from_pretrained(out, local_files_only=True)) > 1000
    original = tiny_hf.model.state_dict()
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, original[k])]
    assert changed == ["visual_projection.weight"]

    images = _images(tiny_hf)
    T = tiny_hf.encode_text(CLASSES, TEMPLATES)
    expected = clip_logits(tiny_hf.encode_pre(images), W, None, T, tiny_hf.logit_scale)
    with torch.no_grad():
        feats = reloaded.get_image_features(pixel_values=images)
        feats = getattr(feats, "pooler_output", feats)
        got = reloaded.logit_scale.exp() * F.normalize(feats, dim=-1) @ T.T
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_exports_refuse_to_overwrite_unless_forced(tiny_vit, tiny_hf, tmp_path):
    W = _adapted(tiny_vit)
    path = export_open_clip(tiny_vit, W, tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError, match="m.safetensors"):
        export_open_clip(tiny_vit, W, path)
    export_open_clip(tiny_vit, 2 * W, path, force=True)
    torch.testing.assert_close(load_file(str(path))["visual.proj"], 2 * W)

    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="hf"):
        export_hf(tiny_hf, _adapted(tiny_hf), tmp_path / "hf")


def test_export_rejects_wrong_family_and_shape(tiny_vit, tiny_hf, tmp_path):
    with pytest.raises(ValueError, match="HF backbone"):
        export_hf(tiny_vit, _adapted(tiny_vit), tmp_path / "a")
    with pytest.raises(ValueError, match="open_clip backbone"):
        export_open_clip(tiny_hf, _adapted(tiny_hf), tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="shape"):
        export_open_clip(tiny_vit, torch.zeros(3, 3), tmp_path / "c.safetensors")
    assert not any(tmp_path.iterdir())


def test_classifier_head_round_trip(tiny_vit, tmp_path):
    T = tiny_vit.encode_text(CLASSES, TEMPLATES)
    save_classifier_head(T, CLASSES, TEMPLATES, tmp_path)
    T2, names, templates = load_classifier_head(tmp_path)
    torch.testing.assert_close(T2, T)
    assert names == CLASSES and templates == TEMPLATES
    with pytest.raises(FileExistsError, match="classifier_head"):
        save_classifier_head(T, CLASSES, TEMPLATES, tmp_path)
    save_classifier_head(-T, CLASSES, TEMPLATES, tmp_path, force=True)
    torch.testing.assert_close(load_classifier_head(tmp_path)[0], -T)
    with pytest.raises(ValueError, match="class names"):
        save_classifier_head(T, CLASSES[:2], TEMPLATES, tmp_path / "x")


def test_export_folders_are_recognised_as_prolip_exports(tiny_vit, tiny_hf, tmp_path):
    """What lets a later --force replace an export: its marker, its head, its checkpoints' metadata; nothing else."""
    from prolip.outputs import kind_of

    T = tiny_vit.encode_text(CLASSES, TEMPLATES)
    export_open_clip(tiny_vit, _adapted(tiny_vit), tmp_path / "oc" / "open_clip_model.safetensors")
    assert kind_of(tmp_path / "oc") == "export"  # the checkpoint says it was exported by prolip
    save_classifier_head(T, CLASSES, TEMPLATES, tmp_path / "oc")
    assert kind_of(tmp_path / "oc") == "export"
    export_hf(tiny_hf, _adapted(tiny_hf), tmp_path / "hf")
    save_classifier_head(T, CLASSES, TEMPLATES, tmp_path / "hf")
    assert kind_of(tmp_path / "hf") == "export"
    (tmp_path / "hf" / "notes.txt").write_text("a user's file")
    assert kind_of(tmp_path / "hf") is None  # no longer only ours: --force will not replace it
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "oc" / "other.safetensors"))
    assert kind_of(tmp_path / "oc") is None  # a checkpoint prolip did not write


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_an_export_folder_is_written_whole_or_not_at_all(fmt, tiny_vit, tiny_hf, tmp_path, monkeypatch):
    """`prolip export`'s folder (checkpoint, head, card, marker) is one atomic write: a failure part-way leaves the
    earlier export as it was, or none, and no temporary beside it."""
    import errno
    import json

    import prolip.export
    from prolip.export import export_folder
    from prolip.outputs import EXPORT_MARKER, OutputError, kind_of

    backbone = tiny_vit if fmt == "open_clip" else tiny_hf
    T = backbone.encode_text(CLASSES, TEMPLATES)
    out = tmp_path / "export"
    written = export_folder(
        backbone, _adapted(backbone), out, fmt=fmt, head=(T, CLASSES, TEMPLATES), card="# card\n", force=False
    )
    assert written == (out / "open_clip_model.safetensors" if fmt == "open_clip" else out)
    assert kind_of(out) == "export" and (out / "README.md").read_text() == "# card\n"
    listed = json.loads((out / EXPORT_MARKER).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != EXPORT_MARKER)
    torch.testing.assert_close(load_classifier_head(out)[0], T.float())
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(folder, *a):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "classifier_head.safetensors"))

    monkeypatch.setattr(prolip.export, "_write_head", full_disk)
    for target, force in ((out, True), (tmp_path / "fresh", False)):
        with pytest.raises(OutputError, match=rf"could not write {target} \(classifier_head.safetensors\): No space"):
            export_folder(backbone, _adapted(backbone, 1), target, fmt=fmt, head=(T, CLASSES, TEMPLATES), force=force)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
