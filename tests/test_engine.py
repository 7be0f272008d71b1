"""ONNX Runtime as the extraction engine (the onnx extra): the image tower exported once, features equal to
PyTorch's to float32 rounding, kept in their own cache namespace; unknown or missing engines refused by name."""

from __future__ import annotations

import pytest
import torch

from prolip.features import FeatureCache
from prolip.features.engine import resolve_engine


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be one of torch, onnxruntime"):
        resolve_engine("tensorrt")
    assert resolve_engine(None) in ("torch", "onnxruntime")


@pytest.mark.parametrize("backbone_fixture", ["tiny_vit", "tiny_rn"])
def test_onnxruntime_features_equal_torch_and_live_apart(tmp_path, shared_data, request, backbone_fixture):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    backbone = request.getfixturevalue(backbone_fixture)
    paths = sorted((shared_data / "dtd10").rglob("*.jpg"))[:5]
    torch_cache = FeatureCache(tmp_path, backbone, progress=False, engine="torch")
    ort_cache = FeatureCache(tmp_path, backbone, progress=False, engine="onnxruntime", batch_size=3)
    expected = torch_cache.center(paths).features
    got = ort_cache.center(paths).features
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # float16 storage: 1e-3 is its rounding
    assert ort_cache.namespace_dir("center", 0) != torch_cache.namespace_dir("center", 0)
    views = ort_cache.views(paths[:2], 3).to_tensor().float()
    reference = torch_cache.views(paths[:2], 3).to_tensor().float()
    torch.testing.assert_close(views, reference, rtol=1e-3, atol=1e-3)
    exported = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(exported) == 1  # one export per backbone, reused by every later request
    again = FeatureCache(tmp_path, backbone, progress=False, engine="onnxruntime")
    assert torch.equal(again.center(paths).features, got) and again.stats.forward_passes == 0


def test_cli_extract_with_the_onnxruntime_engine(tmp_path, tiny_image_folder):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from click.testing import CliRunner

    from prolip.cli import main

    args = [
        "extract",
        "--data",
        str(tiny_image_folder),
        "--model",
        "test-vit-tiny",
        "--pretrained",
        "none",
        "--views",
        "0",
        "--cache-dir",
        str(tmp_path),
    ]
    r = CliRunner().invoke(main, [*args, "--engine", "onnxruntime"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1
    import click

    from prolip.cli.extract import _check_engine

    with pytest.raises(click.ClickException, match="runs on the CPU"):
        _check_engine("onnxruntime", "cuda")
