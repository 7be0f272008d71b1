"""What the `prolip` commands share: the option groups (backbone, cache, data), and the few steps every command
takes the same way (loading a backbone loudly, reserving --out, resolving --data, checking --device, echoing what
the library left out of the data). Heavy imports (torch, open_clip) happen inside functions so `prolip --help` stays
instant."""

from __future__ import annotations

from pathlib import Path

import click

from prolip.choices import ON_BAD_IMAGE


def init_from_env(device):
    from prolip.distributed import init_from_env as init

    return init(device)


def fail(message: str) -> None:
    raise click.ClickException(message)


def path_option(*names: str, help: str):
    """An optional path option (None when not given)."""
    return click.option(*names, type=click.Path(path_type=Path), default=None, help=help)


TOKENIZER_META = "prolip.tokenizer"


def _remember_tokenizer(ctx: click.Context, _param, value: Path | None) -> None:
    # Kept on the context, not passed as an argument, so every command taking the backbone options reads it in
    # backbone_from_options without a parameter of its own.
    ctx.meta[TOKENIZER_META] = None if value is None else str(value)


def backbone_options(f):
    f = click.option(
        "--tokenizer",
        type=click.Path(path_type=Path),
        default=None,
        expose_value=False,
        callback=_remember_tokenizer,
        help="a local tokenizer folder (save_pretrained, or holding tokenizer.json) for models whose tokenizer is a "
        "Hugging Face one (SigLIP, multilingual CLIPs, hf: models) [default: the one beside the weights, else the "
        "Hub's from the local cache]",
    )(f)
    f = click.option(
        "--site",
        type=click.Choice(["native", "output"]),
        default="native",
        show_default=True,
        help="where W sits: the model's own last projection, or an identity map on its image embedding (every "
        "model has one; `prolip models` lists which have a native site)",
    )(f)
    f = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda")(f)
    f = click.option(
        "--pretrained",
        default="openai",
        show_default=True,
        help="open_clip pretrained tag, a local checkpoint file, or 'none' for random init",
    )(f)
    f = click.option(
        "--model",
        default="ViT-B-16",
        show_default=True,
        help="open_clip architecture (ViT-B-16, RN50, ...) or hf:<hub id or local dir> (CLIPModel, SiglipModel)",
    )(f)
    return f


def cache_options(f):
    f = click.option(
        "--on-bad-image",
        type=click.Choice(ON_BAD_IMAGE),
        default="error",
        show_default=True,
        help="stop at an unreadable image, or skip it (skips are counted and listed in the run)",
    )(f)
    f = click.option(
        "--extract-dtype",
        type=click.Choice(["auto", "fp32", "bf16"]),
        default="auto",
        show_default=True,
        help="what the backbone computes in while caching features (auto: bf16 on CUDA, fp32 on CPU)",
    )(f)
    f = click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="image-decoding threads [default: 0 on CPU, up to 16 on CUDA]",
    )(f)
    f = click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=64,
        show_default=True,
        help="images per backbone forward pass",
    )(f)
    f = path_option("--cache-dir", help="feature cache directory [default: $PROLIP_CACHE_DIR or ~/.cache/prolip]")(f)
    return f


def label_key_option(f):
    """--label-key and --image-key: which member or column of a sample holds its class and its image."""
    f = click.option(
        "--image-key",
        default=None,
        help="tar shards: the extension of each sample's image member; hf: datasets: the image column "
        "[default: the only one; several must be chosen]",
    )(f)
    return click.option(
        "--label-key",
        default=None,
        help="tar shards: the member holding each sample's class index [default: cls]; hf: datasets: "
        "the label column [default: its ClassLabel column]",
    )(f)


def data_options(f):
    f = path_option("--templates", "templates_file", help="prompt templates file, one per line, each containing {}")(f)
    f = path_option("--classnames", "classnames_file", help="class names file (one per line, in sorted folder order)")(
        f
    )
    f = path_option(
        "--data-root", help="root folder of the benchmark datasets (CoOp layout) when --data names a benchmark"
    )(f)
    return f


def backbone_from_options(model: str, pretrained: str, device: str, site: str = "native"):
    from prolip.backbones import load_backbone

    ctx = click.get_current_context(silent=True)
    tokenizer = None if ctx is None else ctx.meta.get(TOKENIZER_META)
    return announced(lambda: load_backbone(model, pretrained, device=device, site=site, tokenizer=tokenizer))


def announced(load):
    """The backbone ``load()`` builds, its load errors as one line, and random weights said once, loudly."""
    import warnings

    from prolip.backbones import BackboneLoadError, RandomWeightsWarning

    try:
        with warnings.catch_warnings():  # the library's warning would repeat the line printed below
            warnings.simplefilter("ignore", RandomWeightsWarning)
            backbone = load()
    except BackboneLoadError as e:
        fail(str(e))
    if backbone.info.random_weights:
        click.secho(
            f"WARNING: {backbone.info.describe()}: every number below comes from RANDOM weights.", fg="yellow", err=True
        )
    return backbone


def reserve_out(out: Path, force: bool, data_paths, kind: str) -> None:
    """Pre-flight for --out, before any extraction or training: the output rules of prolip.outputs (never over
    the data or anything prolip did not write), and the lock that keeps a second prolip process off this --out
    until the command ends."""
    import os

    from prolip.outputs import OutputError, reserve

    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes; the others only check
    try:
        click.get_current_context().with_resource(reserve(out, force, data_paths, kind=kind, lock=writer))
    except OutputError as e:
        fail(str(e))


def data_read(data, data_root, classnames_file=None, templates_file=None, *more) -> list:
    from prolip.data import paths_read

    return [
        *paths_read(str(data), root=data_root, classnames_file=classnames_file, templates_file=templates_file),
        *(p for p in more if p is not None),
    ]


def feature_cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype="auto"):
    from prolip.features import FeatureCache

    try:
        return FeatureCache(
            cache_dir,
            backbone,
            batch_size=batch_size,
            num_workers=workers,
            on_bad_image=on_bad_image,
            compute_dtype=extract_dtype,
        )
    except ValueError as e:
        fail(str(e))


def resolve(
    data, data_root, classnames_file, templates_file, split=None, label_key=None, image_key=None, cache_dir=None
):
    """``--data`` resolved; a scanned folder's listing is remembered under ``--cache-dir`` with the features."""
    from prolip.data import resolve_data

    try:
        return resolve_data(
            str(data),
            root=data_root,
            classnames_file=classnames_file,
            templates_file=templates_file,
            split=split,
            label_key=label_key,
            image_key=image_key,
            cache_dir=cache_dir,
        )
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


def hyperparameters_from(shortcuts: dict, pairs: tuple[str, ...]) -> dict:
    """``--hp key=value`` pairs (YAML values) plus the shortcut flags that were given; a key given twice is refused."""
    import yaml

    from prolip.bench.experiment import load_yaml

    hp = {k: v for k, v in shortcuts.items() if v is not None}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected key=value, e.g. --hp lr=1e-3", param_hint="--hp")
        if key in hp:
            raise click.BadParameter(f"{key} is given twice (--hp and --{key})", param_hint="--hp")
        try:
            hp[key.strip()] = load_yaml(value)
        except yaml.YAMLError as e:
            raise click.BadParameter(
                f"{pair!r}: the value is not valid YAML ({e.problem})", param_hint="--hp"
            ) from None
    return hp


def check_device(device: str) -> None:
    """Refuse an unknown or unavailable --device before any model is built."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise click.BadParameter(f"{device!r} is not a torch device ({e})", param_hint="--device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(
            f"{device!r}: no CUDA device is available here; use --device cpu", param_hint="--device"
        )
    if kind not in ("cpu", "cuda"):
        raise click.BadParameter(f"{device!r}: prolip runs on cpu or cuda", param_hint="--device")


def load_run(run_dir):
    from prolip.run import Run

    return Run.load(run_dir)


def backbone_for_run(run, device):
    return announced(lambda: run.backbone(device))


def echo_left_out(report: dict, on_bad_image: str, out: Path | None = None) -> None:
    """On stderr, the files the library left out of the data (``report`` lists and counts them): never a silent
    change of the data."""
    skipped, ignored = report.get("skipped_images", []), report.get("ignored_files", [])
    where = f", listed in {out / 'manifest.json'}" if out is not None else ""
    if skipped:
        click.secho(
            f"skipped {len(skipped)} unreadable image(s) (--on-bad-image {on_bad_image}){where}:", fg="yellow", err=True
        )
        echo_some(f"{p}: {r}" for p, r in skipped)
    if ignored:
        click.secho(f"ignored {len(ignored)} non-image file(s) in the class folders{where}:", fg="yellow", err=True)
        echo_some(ignored)


def echo_some(lines, limit: int = 20) -> None:
    lines = list(lines)
    for line in lines[:limit]:
        click.echo(f"  {line}", err=True)
    if len(lines) > limit:
        click.echo(f"  … and {len(lines) - limit} more", err=True)
