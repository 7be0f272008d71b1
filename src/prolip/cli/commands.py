"""`prolip fit | eval | predict | export | extract`: the product path, as thin wrappers over the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import click

# Heavy imports (torch, open_clip) happen inside commands so `prolip --help` stays instant.


def init_from_env(device):
    from prolip.distributed import init_from_env as init

    return init(device)


def _fail(message: str) -> None:
    raise click.ClickException(message)


def path_option(*names: str, help: str):
    """An optional path option (None when not given)."""
    return click.option(*names, type=click.Path(path_type=Path), default=None, help=help)


def backbone_options(f):
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
        help="open_clip architecture (ViT-B-16, RN50, ...) or hf:<hub id or local dir>",
    )(f)
    return f


def cache_options(f):
    f = click.option(
        "--on-bad-image",
        type=click.Choice(["error", "skip"]),
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


def _load_backbone(model: str, pretrained: str, device: str):
    from prolip.backbones import load_backbone

    return _announced(lambda: load_backbone(model, pretrained, device=device))


def _announced(load):
    """The backbone ``load()`` builds, its load errors as one line, and random weights said once, loudly."""
    import warnings

    from prolip.backbones import BackboneLoadError, RandomWeightsWarning

    try:
        with warnings.catch_warnings():  # the library's warning would repeat the line printed below
            warnings.simplefilter("ignore", RandomWeightsWarning)
            backbone = load()
    except BackboneLoadError as e:
        _fail(str(e))
    if backbone.info.random_weights:
        click.secho(
            f"WARNING: {backbone.info.describe()}: every number below comes from RANDOM weights.", fg="yellow", err=True
        )
    return backbone


def _reserve_out(out: Path, force: bool, data_paths, kind: str) -> None:
    """Pre-flight for --out, before any extraction or training: the output rules of prolip.outputs (never over
    the data or anything prolip did not write), and the lock that keeps a second prolip process off this --out
    until the command ends."""
    import os

    from prolip.outputs import OutputError, reserve

    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes; the others only check
    try:
        click.get_current_context().with_resource(reserve(out, force, data_paths, kind=kind, lock=writer))
    except OutputError as e:
        _fail(str(e))


def _data_read(data, data_root, classnames_file=None, templates_file=None, *more) -> list:
    from prolip.data import paths_read

    return [
        *paths_read(str(data), root=data_root, classnames_file=classnames_file, templates_file=templates_file),
        *(p for p in more if p is not None),
    ]


def _cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype="auto"):
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
        _fail(str(e))


def _resolve(data, data_root, classnames_file, templates_file, split=None, label_key=None):
    from prolip.data import resolve_data

    try:
        return resolve_data(
            str(data),
            root=data_root,
            classnames_file=classnames_file,
            templates_file=templates_file,
            split=split,
            label_key=label_key,
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def _hyperparameters(shortcuts: dict, pairs: tuple[str, ...]) -> dict:
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


@click.command("fit")
@click.option(
    "--data",
    required=True,
    help="image folder, CSV/JSON image list, CoOp dataset folder, benchmark name, tar shards "
    "('shards/train-{000000..000009}.tar') or a Hugging Face dataset on disk (hf:/path)",
)
@click.option(
    "--split",
    "train_split",
    default=None,
    help="hf: datasets: the split to draw the shots from [default: train] (its test split is evaluated)",
)
@click.option(
    "--shots", type=click.IntRange(min=1), default=16, show_default=True, help="labelled images per class (N)"
)
@click.option("--seed", default=1, show_default=True, help="few-shot sampling and training seed")
@click.option("--method", default="prolip", show_default=True, help="adaptation method (see `prolip methods`)")
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="augmented views cached per support image",
)
@click.option(
    "--hp",
    "hp_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="any hyperparameter of the method (see `prolip methods -v`), e.g. --hp alpha=0.5; repeatable",
)
@click.option("--lr", type=float, default=None, help="shortcut for --hp lr=... [prolip default: 1e-5]")
@click.option("--lam", default=None, help="shortcut for --hp lam=...: a number, '1/N' (prolip's default) or '1/N2'")
@click.option("--steps", type=int, default=None, help="shortcut for --hp steps=... [prolip default: 300]")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "reference"]),
    default=None,
    help="shortcut for --hp precision=...: fp32 master weights (default) or the reference's float16",
)
@click.option(
    "--validate",
    is_flag=True,
    help="select what the method selects (prolip: lr and λ on the 49-point grid) on an N-shot validation set",
)
@click.option(
    "--sampler",
    type=click.Choice(["lpp", "coop"]),
    default="lpp",
    show_default=True,
    help="few-shot sampling convention (LP++/ProLIP or CoOp)",
)
@click.option(
    "--allow-fewer",
    is_flag=True,
    help="let classes with fewer than --shots images take part: the coop sampler uses all a short class "
    "has; the lpp sampler draws --shots with repeats, as the LP++/ProLIP code does",
)
@path_option(
    "--val",
    "val_dir",
    help="image folder to evaluate on (default: the test split, or the images not used for training)",
)
@click.option("--aug-seed", default=0, show_default=True, help="seed of the cached augmentations")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs/latest"),
    show_default=True,
    help="run directory to write",
)
@click.option("--force", is_flag=True, help="replace --out if it is an earlier prolip run (or empty)")
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
@label_key_option
@data_options
@cache_options
@backbone_options
def fit_cmd(
    data,
    train_split,
    shots,
    seed,
    method,
    views,
    hp_pairs,
    lr,
    lam,
    steps,
    precision,
    validate,
    sampler,
    allow_fewer,
    val_dir,
    aug_seed,
    out,
    force,
    as_json,
    label_key,
    data_root,
    classnames_file,
    templates_file,
    cache_dir,
    batch_size,
    workers,
    extract_dtype,
    on_bad_image,
    model,
    pretrained,
    device,
):
    """Cache features, train a method on N shots per class, evaluate, and save a run directory."""
    from prolip import pipeline, runcard
    from prolip.methods import configure

    hp = _hyperparameters({"lr": lr, "lam": lam, "steps": steps, "precision": precision}, hp_pairs)
    check_device(device)
    configure(method, hp, validate=validate)  # a bad method or hyperparameter fails before any work
    _reserve_out(out, force, _data_read(data, data_root, classnames_file, templates_file, val_dir), "run")
    splits = _resolve(data, data_root, classnames_file, templates_file, train_split, label_key)
    eval_images = _val_images(val_dir, classnames_file)
    rank, _ = init_from_env(device)  # under torchrun: extraction and the grid search are split across processes
    backbone = _load_backbone(model, pretrained, device)
    cache = _cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype)
    config = pipeline.FitConfig(
        shots=shots,
        seed=seed,
        method=method,
        hyperparameters=hp,
        views=views,
        aug_seed=aug_seed,
        sampler=sampler,
        allow_fewer=allow_fewer,
        use_validation=validate,
    )
    try:
        result = pipeline.fit(
            backbone,
            splits,
            cache,
            config,
            eval_images=eval_images,
            data_spec=str(data),
            announce=lambda line: click.echo(line, err=True) if rank == 0 else None,
            command=runcard.command_line(),
        )
    except ValueError as e:
        _fail(str(e))
    _echo_left_out(result.run.manifest, on_bad_image, out)
    if rank == 0:  # every rank holds the same result; one writes it
        try:
            result.run.save(out, force=force)
        except ValueError as e:  # OutputError, or a run that could not be loaded back (NaN weights)
            _fail(str(e))
        _report_metrics(result.metrics, backbone, as_json, out)


def _val_images(val_dir, classnames_file):
    if val_dir is None:
        return None
    from prolip.data import read_image_folder

    return read_image_folder(val_dir, classnames_file)


def _report_metrics(metrics, backbone, as_json, out=None):
    if as_json:
        click.echo(json.dumps({"backbone": backbone.info.describe(), **metrics}, indent=2))
        return
    note = " (RANDOM weights)" if backbone.info.random_weights else ""
    if "accuracy" in metrics:
        click.echo(
            f"accuracy {metrics['accuracy']:.2f}%  zero-shot {metrics['zero_shot_accuracy']:.2f}%  "
            f"on {metrics['eval_images']} {metrics['eval_set']}{note}"
        )
    else:
        click.echo(f"not evaluated: no {metrics['eval_set']} left (every image was used for support or validation)")
    if out is not None:
        click.echo(f"saved run to {out}")


@click.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--data",
    required=True,
    help="image folder, image list, CoOp dataset folder, benchmark name, tar shards or hf:/path",
)
@click.option(
    "--split",
    type=click.Choice(["test", "val", "train"]),
    default=None,
    help="which split of a benchmark, CLIP_benchmark shard folder or hf: dataset to evaluate [default: "
    "test] (val: an hf: dataset's validation, valid or dev split; a plain folder has only its images)",
)
@click.option("--tta", is_flag=True, help="test-time ProLIP on each image (64 views, one step)")
@click.option(
    "--tta-views", type=click.IntRange(min=1), default=64, show_default=True, help="views per image for --tta"
)
@click.option(
    "--json", "as_json", is_flag=True, help="print JSON: the metrics, the per-class table and the confusion matrix"
)
@path_option("--out", help="also write eval.json, per_class.csv and confusion_matrix.png into this folder")
@click.option("--force", is_flag=True, help="replace --out if it is an earlier prolip evaluation (or empty)")
@label_key_option
@path_option("--classnames", "classnames_file", help="class names file (one per line, in sorted folder order)")
@path_option("--data-root", help="root folder of the benchmark datasets (CoOp layout) when --data names a benchmark")
@cache_options
@click.option("--device", default="cpu", show_default=True)
def eval_cmd(
    run_dir,
    data,
    split,
    tta,
    tta_views,
    as_json,
    out,
    force,
    label_key,
    classnames_file,
    data_root,
    cache_dir,
    batch_size,
    workers,
    extract_dtype,
    on_bad_image,
    device,
):
    """Evaluate a saved run on a dataset (the run's own support and validation images are left out): top-1, top-5,
    mean per-class accuracy, the worst classes and the most confused pairs."""
    from prolip.inference import evaluate_run
    from prolip.tta import TTAConfig

    check_device(device)
    run = _load_run(run_dir)
    if out is not None:
        _reserve_out(out, force, [*_data_read(data, data_root, classnames_file), run_dir], "eval")
    splits = _resolve(data, data_root, classnames_file, None, label_key=label_key)
    backbone = _backbone_for_run(run, device)
    cache = None if tta else _cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype)
    report = evaluate_run(
        run, splits, split=split, tta=TTAConfig(views=tta_views) if tta else None, backbone=backbone, cache=cache
    )
    report["run"] = str(run_dir)
    _echo_left_out(report, on_bad_image)
    if out is not None:
        _write_eval(report, out, force)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _echo_eval(report, backbone)


def _echo_eval(report: dict, backbone) -> None:
    from prolip.diagnostics import summary_lines

    note = " (RANDOM weights)" if backbone.info.random_weights else ""
    click.echo(f"accuracy {report['accuracy']:.2f}% on {report['eval_images']} {report['eval_set']}{note}")
    top5, mean = report["top5_accuracy"], report["mean_per_class_accuracy"]
    click.echo(
        f"top-5 {'n/a (5 classes or fewer)' if top5 is None else f'{top5:.2f}%'}  mean per-class "
        f"{'n/a' if mean is None else f'{mean:.2f}%'}"
    )
    for line in summary_lines(report):
        click.echo(line)


def _write_eval(report: dict, out: Path, force: bool) -> None:
    """eval.json (the report), per_class.csv and confusion_matrix.png, written as one folder (atomically)."""
    from prolip.diagnostics import write_eval_files
    from prolip.outputs import EVAL_FORMAT, write_directory

    def fill(folder: Path) -> None:
        (folder / "eval.json").write_text(json.dumps({"format": EVAL_FORMAT, **report}, indent=2) + "\n")
        write_eval_files(report, folder, title=Path(report["run"]).name)

    try:
        write_directory(out, fill, force=force, kind="eval")
    except ValueError as e:
        _fail(str(e))
    click.echo(f"wrote {out / 'eval.json'}, per_class.csv and confusion_matrix.png", err=True)


def _load_run(run_dir):
    from prolip.run import Run

    return Run.load(run_dir)


def _backbone_for_run(run, device):
    return _announced(lambda: run.backbone(device))


@click.command("predict")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--tta", is_flag=True, help="test-time ProLIP on each image")
@click.option(
    "--tta-views", type=click.IntRange(min=1), default=64, show_default=True, help="views per image for --tta"
)
@click.option("--json", "as_json", is_flag=True, help="print predictions as JSON")
@click.option("--device", default="cpu", show_default=True)
def predict_cmd(run_dir, images, top_k, tta, tta_views, as_json, device):
    """Classify image files with a saved run: top-k class names and probabilities."""
    from prolip.tta import TTAConfig

    check_device(device)
    run = _load_run(run_dir)
    backbone = _backbone_for_run(run, device)
    config = TTAConfig(views=tta_views) if tta else None
    results = run.predict([Path(p) for p in images], top_k=top_k, tta=config, backbone=backbone)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["image"])
        for pred in r["predictions"]:
            click.echo(f"  {pred['probability'] * 100:6.2f}%  {pred['class']}")


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory to write")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "open_clip", "hf"]),
    default="auto",
    show_default=True,
    help="open_clip state dict (safetensors) or Hugging Face save_pretrained directory",
)
@click.option("--force", is_flag=True, help="replace --out if it is an earlier prolip export (or empty)")
@click.option("--device", default="cpu", show_default=True)
def export_cmd(run_dir, out, fmt, force, device):
    """Merge what the run adapted (projection, fine-tuned encoder) into a standard CLIP checkpoint (+ the zero-shot
    head beside it)."""
    from prolip import export, inference

    check_device(device)
    run = _load_run(run_dir)
    _reserve_out(out, force, [run_dir], "export")
    backbone = _backbone_for_run(run, device)
    tensors = inference.checkpoint_tensors(inference.method_from_run(backbone, run), run, backbone)
    if fmt == "auto":
        fmt = backbone.family.export_format
    try:
        if fmt == "hf":
            written = export.export_hf(backbone, tensors, out, force=force)
        else:
            out.mkdir(parents=True, exist_ok=True)
            written = export.export_open_clip(backbone, tensors, out / "open_clip_model.safetensors", force=force)
        export.save_classifier_head(run.classifier, run.classnames, run.templates, out, force=force)
        if run.card is not None:  # the run card, beside the checkpoint as its model card
            export.save_model_card(run.card, out, force=force)
    except (FileExistsError, ValueError) as e:
        _fail(str(e))
    click.echo(f"exported {fmt} checkpoint to {written}")


@click.command("extract")
@click.option("--data", required=True)
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="all", show_default=True)
@click.option(
    "--views",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="augmented views per training image (0: center only)",
)
@click.option("--aug-seed", default=0, show_default=True)
@path_option("--data-root", help="root folder of the benchmark datasets (CoOp layout) when --data names a benchmark")
@click.option(
    "--engine",
    type=click.Choice(["torch", "onnxruntime"]),
    default=None,
    help="what computes the features on the CPU [default: $PROLIP_ENGINE or torch]; onnxruntime needs the "
    "onnx extra and caches apart from torch (equal to float32 rounding, not bitwise)",
)
@label_key_option
@cache_options
@backbone_options
def extract_cmd(
    data,
    split,
    views,
    aug_seed,
    data_root,
    label_key,
    cache_dir,
    batch_size,
    workers,
    extract_dtype,
    on_bad_image,
    model,
    pretrained,
    device,
    engine=None,
):
    """Fill the feature cache ahead of time (works under torchrun: images are sharded across processes)."""
    from prolip.features import extract_dataset

    check_device(device)
    _check_engine(engine, device)
    splits = _resolve(data, data_root, None, None, label_key=label_key)
    wanted = ["train", "val", "test"] if split == "all" else [split]
    if split != "all" and getattr(splits, split) is None:
        _fail(
            f"--split {split}: --data {data} has no {split} split (a plain folder or list has only its images: "
            "use --split train or all)"
        )
    rank, world = init_from_env(device)
    backbone = _load_backbone(model, pretrained, device)
    for name in wanted:
        images = getattr(splits, name)
        if images is None:
            continue
        paths = [it.path for it in images.items]
        stats = extract_dataset(
            backbone,
            paths,
            num_views=views if name == "train" else 0,
            cache_dir=cache_dir,
            aug_seed=aug_seed,
            batch_size=batch_size,
            num_workers=workers,
            on_bad_image=on_bad_image,
            compute_dtype=extract_dtype,
            engine=engine,
        )
        who = f"rank {rank}/{world} " if world > 1 else ""
        click.echo(f"{who}{name}: {len(paths)} images, {stats}", err=True)


def _check_engine(engine, device) -> None:
    from prolip.features.engine import resolve_engine

    try:
        if resolve_engine(engine) != "torch" and device != "cpu":
            _fail(f"--engine {engine} runs on the CPU; drop it or use --device cpu")
    except ValueError as e:  # unknown, or not installed
        _fail(str(e))


@click.command("methods")
@click.option("-v", "--verbose", is_flag=True, help="also show each method's hyperparameters and capabilities")
def methods_cmd(verbose):
    """List the available adaptation methods."""
    from prolip.methods import available, method_class

    for name in available():
        click.echo(name)
        if verbose:
            cls = method_class(name)
            params = ", ".join(f"{k}={v!r}" for k, v in cls.defaults().items()) or "(none)"
            click.echo(f"  hyperparameters: {params}")
            click.echo(f"  selects on validation: {cls.selects or 'nothing (validation-free)'}")
            can = [
                what
                for what, flag in (
                    ("scores other class sets", cls.accepts_classifier),
                    ("exposes an adapted projection (TTA)", cls.exposes_projection),
                    ("trains inside the image encoder", cls.encodes_images),
                    ("uses the text side", cls.uses_text_side),
                )
                if flag
            ]
            click.echo(f"  can: {', '.join(can) or '-'}")


def _echo_left_out(report: dict, on_bad_image: str, out: Path | None = None) -> None:
    """On stderr, the files the library left out of the data (``report`` lists and counts them): never a silent
    change of the data."""
    skipped, ignored = report.get("skipped_images", []), report.get("ignored_files", [])
    where = f", listed in {out / 'manifest.json'}" if out is not None else ""
    if skipped:
        click.secho(
            f"skipped {len(skipped)} unreadable image(s) (--on-bad-image {on_bad_image}){where}:", fg="yellow", err=True
        )
        _echo_some(f"{p}: {r}" for p, r in skipped)
    if ignored:
        click.secho(f"ignored {len(ignored)} non-image file(s) in the class folders{where}:", fg="yellow", err=True)
        _echo_some(ignored)


def _echo_some(lines, limit: int = 20) -> None:
    lines = list(lines)
    for line in lines[:limit]:
        click.echo(f"  {line}", err=True)
    if len(lines) > limit:
        click.echo(f"  … and {len(lines) - limit} more", err=True)
