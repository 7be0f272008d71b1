"""Which inference engine computes the pre-projection features: PyTorch eager (the default) or ONNX Runtime.

ONNX Runtime (``pip install 'prolip[onnx]'``) runs the backbone's image tower, exported once per backbone to ONNX
(``<cache root>/onnx/<fingerprint>.onnx``, written atomically), with its graph optimisations (fused LayerNorm and
bias+GELU, constant folding) and its own GEMM kernels. Its features equal PyTorch's to float32 rounding (about 1e-6
relative on ViT-B/16), not bitwise, so they live in their own cache namespace (``FeatureCache`` adds the engine to
the namespace whenever it is not ``torch``). Measured against PyTorch in benchmarks/README.md ("Extraction rate").
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

ENGINES = ("torch", "onnxruntime")
ENGINE_ENV = "PROLIP_ENGINE"  # the engine every cache uses unless given one


def resolve_engine(engine: str | None) -> str:
    """The engine to use: the given one, else $PROLIP_ENGINE, else PyTorch; refuses unknown names and an engine
    that is not installed, naming the fix."""
    engine = engine or os.environ.get(ENGINE_ENV) or "torch"
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "onnxruntime":
        try:
            import onnx  # noqa: F401 - the exporter needs it
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ValueError("engine 'onnxruntime' needs the onnx extra: pip install 'prolip[onnx]'") from None
    return engine


class _PreProjection(torch.nn.Module):
    """The backbone's encode_pre as a module, so that its weights become the exported graph's initialisers."""

    def __init__(self, backbone):
        super().__init__()
        self.model, self.backbone = backbone.model, backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.encode_pre(images)


def export_onnx(backbone, path: Path) -> Path:
    """Export ``backbone.encode_pre`` (batch dimension dynamic) to ``path``, atomically; returns ``path``."""
    size = backbone.preprocessing.image_size
    example = torch.zeros(2, 3, size, size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants; fine here
            torch.onnx.export(
                _PreProjection(backbone).eval(),
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=["images"],
                output_names=["z"],
                dynamic_axes={"images": {0: "batch"}, "z": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    return path


class OnnxRuntimeEncoder:
    """A stand-in for the backbone in the feature extractor: ``encode_pre`` through ONNX Runtime on the CPU, with
    as many threads as torch uses; everything else is the backbone's."""

    engine = "onnxruntime"

    def __init__(self, backbone, model_dir: Path):
        self.backbone, self.model_dir = backbone, Path(model_dir)
        self._session = None  # exported and loaded on the first batch: a fully cached request needs neither

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            b = self.backbone
            ident = f"{b.info.fingerprint}|{b.preprocessing.image_size}|opset17|torch {torch.__version__}"
            path = self.model_dir / f"{hashlib.blake2b(ident.encode(), digest_size=12).hexdigest()}.onnx"
            if not path.exists():
                export_onnx(b, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._session

    def __getattr__(self, name: str):
        return getattr(self.backbone, name)

    @property
    def device(self) -> str:
        return "cpu"

    def encode_pre(self, images: Tensor) -> Tensor:
        x = images.to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session().run(None, {"images": x})[0])


def encoder_for(backbone, engine: str, cache_root: Path):
    """What the extractor encodes images with: the backbone itself (torch) or its ONNX Runtime stand-in."""
    if engine == "torch":
        return backbone
    if torch.device(backbone.device).type != "cpu":
        raise ValueError(f"engine {engine!r} runs on the CPU; the backbone is on {backbone.device}")
    return OnnxRuntimeEncoder(backbone, Path(cache_root) / "onnx")
