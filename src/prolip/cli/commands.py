"""`prolip fit | eval | predict | export | extract`: the product path, as thin wrappers over the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

# Heavy imports (torch, open_clip) happen inside commands so `prolip --help` stays instant.


def init_from_env(device):
    from prolip.distributed import init_from_env as init

    return init(device)


def _fail(message: str) -> None:
    raise click.ClickException(message)


def backbone_options(f):
    f = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda")(f)
    f = click.option("--pretrained", default="openai", show_default=True,
                     help="open_clip pretrained tag, a local checkpoint file, or 'none' for random init")(f)
    f = click.option("--model", default="ViT-B-16", show_default=True,
                     help="open_clip architecture (ViT-B-16, RN50, ...) or hf:<hub id or local dir>")(f)
    return f


def cache_options(f):
    f = click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default="error", show_default=True,
                     help="stop at an unreadable image, or skip it (skips are counted and listed in the run)")(f)
    f = click.option("--extract-dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                     help="what the backbone computes in while caching features (auto: bf16 on CUDA, fp32 on CPU)")(f)
    f = click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="image-decoding threads [default: 0 on CPU, up to 16 on CUDA]")(f)
    f = click.option("--batch-size", default=64, show_default=True, help="images per backbone forward pass")(f)
    f = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="feature cache directory [default: $PROLIP_CACHE_DIR or ~/.cache/prolip]")(f)
    return f


def data_options(f):
    f = click.option("--templates", "templates_file", type=click.Path(path_type=Path), default=None,
                     help="prompt templates file, one per line, each containing {}")(f)
    f = click.option("--classnames", "classnames_file", type=click.Path(path_type=Path), default=None,
                     help="class names file (one per line, in sorted folder order)")(f)
    f = click.option("--data-root", type=click.Path(path_type=Path), default=None,
                     help="root folder of the benchmark datasets (CoOp layout) when --data names a benchmark")(f)
    return f


def _load_backbone(model: str, pretrained: str, device: str):
    from prolip.backbones import BackboneLoadError, load_backbone

    try:
        backbone = load_backbone(model, pretrained, device=device)
    except BackboneLoadError as e:
        _fail(str(e))
    if backbone.info.random_weights:
        click.secho(f"WARNING: {backbone.info.describe()}: every number below comes from RANDOM weights.",
                    fg="yellow", err=True)
    return backbone


def _cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype="auto"):
    from prolip.features import FeatureCache

    try:
        return FeatureCache(cache_dir, backbone, batch_size=batch_size, num_workers=workers, on_bad_image=on_bad_image,
                            compute_dtype=extract_dtype)
    except ValueError as e:
        _fail(str(e))


def _resolve(data, data_root, classnames_file, templates_file):
    from prolip.data import resolve_data

    try:
        return resolve_data(str(data), root=data_root, classnames_file=classnames_file, templates_file=templates_file)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def _parse_lambda(value: str):
    if value in ("1/N", "1/N2"):
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a number, '1/N' or '1/N2'", param_hint="--lam") from None


@click.command("fit")
@click.option("--data", required=True, help="image folder, CSV/JSON image list, CoOp dataset folder or benchmark name")
@click.option("--shots", default=16, show_default=True, help="labelled images per class (N)")
@click.option("--seed", default=1, show_default=True, help="few-shot sampling and training seed")
@click.option("--method", default="prolip", show_default=True, help="adaptation method (see `prolip methods`)")
@click.option("--views", default=300, show_default=True, help="augmented views cached per support image")
@click.option("--lr", type=float, default=None, help="learning rate [prolip default: 1e-5]")
@click.option("--lam", default=None, help="ProLIP regularisation λ: a number, '1/N' (default) or '1/N2'")
@click.option("--steps", type=int, default=None, help="training steps [prolip default: 300]")
@click.option("--precision", type=click.Choice(["fp32", "reference"]), default=None,
              help="fp32 master weights (default) or the reference code's float16 numerics")
@click.option("--validate", is_flag=True, help="select hyperparameters on an N-shot validation set (49-point grid)")
@click.option("--sampler", type=click.Choice(["lpp", "coop"]), default="lpp", show_default=True,
              help="few-shot sampling convention (LP++/ProLIP or CoOp)")
@click.option("--allow-fewer", is_flag=True, help="let classes with fewer than --shots images use all they have")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), default=None,
              help="image folder to evaluate on (default: the test split, or the images not used for training)")
@click.option("--aug-seed", default=0, show_default=True, help="seed of the cached augmentations")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True,
              help="run directory to write")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the metrics as JSON")
@data_options
@cache_options
@backbone_options
def fit_cmd(data, shots, seed, method, views, lr, lam, steps, precision, validate, sampler, allow_fewer, val_dir,
            aug_seed, out, force, as_json, data_root, classnames_file, templates_file, cache_dir, batch_size, workers,
            extract_dtype, on_bad_image, model, pretrained, device):
    """Cache features, train a method on N shots per class, evaluate, and save a run directory."""
    from prolip import pipeline

    if shots <= 0:
        raise click.BadParameter(f"must be a positive number of images per class, got {shots}", param_hint="--shots")
    if views <= 0:
        raise click.BadParameter(f"must be positive, got {views}", param_hint="--views")
    if out.exists() and not force:
        _fail(f"{out} already exists; pass --force to overwrite it or choose another --out")
    hp = {k: v for k, v in {"lr": lr, "lam": None if lam is None else _parse_lambda(lam), "steps": steps,
                            "precision": precision}.items() if v is not None}
    if validate:
        hp["grid"] = True
    splits = _resolve(data, data_root, classnames_file, templates_file)
    eval_images = None
    if val_dir is not None:
        from prolip.data import read_image_folder

        eval_images = read_image_folder(val_dir)
        if eval_images.classnames != splits.classnames:
            _fail(f"--val {val_dir}: its classes {eval_images.classnames[:5]}… differ from the training classes "
                  f"{splits.classnames[:5]}…")
    rank, _ = init_from_env(device)  # under torchrun: extraction and the grid search are split across processes
    backbone = _load_backbone(model, pretrained, device)
    cache = _cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype)
    config = pipeline.FitConfig(shots=shots, seed=seed, method=method, hyperparameters=hp, views=views,
                                aug_seed=aug_seed, sampler=sampler, allow_fewer=allow_fewer, use_validation=validate)
    try:
        result = pipeline.fit(backbone, splits, cache, config, eval_images=eval_images, data_spec=str(data))
    except ValueError as e:
        _fail(str(e))
    _report_skips(result.run.manifest, [splits.train, eval_images], on_bad_image, out, splits.classnames)
    if rank == 0:  # every rank holds the same result; one writes it
        result.run.save(out, force=force)
        _report_metrics(result.metrics, backbone, as_json, out)


def _report_metrics(metrics, backbone, as_json, out=None):
    if as_json:
        click.echo(json.dumps({"backbone": backbone.info.describe(), **metrics}, indent=2))
        return
    note = " (RANDOM weights)" if backbone.info.random_weights else ""
    if "accuracy" in metrics:
        click.echo(f"accuracy {metrics['accuracy']:.2f}%  zero-shot {metrics['zero_shot_accuracy']:.2f}%  "
                   f"on {metrics['eval_images']} {metrics['eval_set']}{note}")
    if out is not None:
        click.echo(f"saved run to {out}")


@click.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="image folder, image list, CoOp dataset folder or benchmark name")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="which split of a benchmark to evaluate (an image folder is used whole)")
@click.option("--tta", is_flag=True, help="test-time ProLIP on each image (64 views, one step)")
@click.option("--tta-views", default=64, show_default=True, help="views per image for --tta")
@click.option("--json", "as_json", is_flag=True)
@data_options
@cache_options
@click.option("--device", default="cpu", show_default=True)
def eval_cmd(run_dir, data, split, tta, tta_views, as_json, data_root, classnames_file, templates_file, cache_dir, batch_size,
             workers, extract_dtype, on_bad_image, device):
    """Evaluate a saved run on a dataset."""
    from prolip import pipeline
    from prolip.functional import accuracy
    from prolip.run import Run, RunError

    try:
        run = Run.load(run_dir)
    except RunError as e:
        _fail(str(e))
    splits = _resolve(data, data_root, classnames_file, templates_file)
    images = getattr(splits, split) if getattr(splits, split, None) is not None else splits.train
    if images is None or not len(images):
        _fail(f"--data {data}: no images in split {split!r}")
    if list(images.classnames) != list(run.classnames):
        _fail(f"--data {data}: its {len(images.classnames)} classes differ from the run's {len(run.classnames)} "
              f"classes ({run.path / 'classnames.json'})")
    backbone = _backbone_for_run(run, device)
    method = pipeline.method_from_run(backbone, run)
    if tta:
        logits, labels = _tta_logits(backbone, method, run, images, tta_views)
    else:
        cache = _cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype)
        z, labels = pipeline.center_features(cache, images)
        logits = method.logits(z)
    metrics = {"accuracy": accuracy(logits, labels), "eval_images": int(len(labels)), "split": split,
               "tta": tta}
    skips = {"skipped_images": [[str(p), r] for p, r in (cache.skipped if not tta else [])]}
    _report_skips(skips, [images], on_bad_image)
    metrics.update(skips)
    if as_json:
        click.echo(json.dumps({"backbone": backbone.info.describe(), "run": str(run_dir), **metrics}, indent=2))
    else:
        note = " (RANDOM weights)" if backbone.info.random_weights else ""
        click.echo(f"accuracy {metrics['accuracy']:.2f}% on {metrics['eval_images']} images{note}")


def _backbone_for_run(run, device):
    from prolip import pipeline

    b = run.manifest["backbone"]
    model = b["arch"] if b["family"] == "open_clip" else f"hf:{b['arch']}"
    backbone = _load_backbone(model, b["weights"], device)
    try:
        pipeline.check_backbone_matches(backbone, run)
    except ValueError as e:
        _fail(str(e))
    return backbone


def _adapted_W(method, run):
    if "W" not in run.method_state:
        _fail(f"run {run.path} used method {run.method_name!r}, which does not adapt the visual projection")
    return run.method_state["W"]


def _tta_logits(backbone, method, run, images, views):
    import torch

    from prolip import tta

    W = _adapted_W(method, run)
    logits = tta.tta_logits(backbone, W, backbone.projection().bias, run.classifier,
                            float(run.manifest["logit_scale"]), [it.path for it in images.items], views=views)
    return logits, torch.tensor(images.labels)


@click.command("predict")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", default=5, show_default=True)
@click.option("--tta", is_flag=True, help="test-time ProLIP on each image")
@click.option("--tta-views", default=64, show_default=True, help="views per image for --tta")
@click.option("--json", "as_json", is_flag=True, help="print predictions as JSON")
@click.option("--device", default="cpu", show_default=True)
def predict_cmd(run_dir, images, top_k, tta, tta_views, as_json, device):
    """Classify image files with a saved run: top-k class names and probabilities."""
    import torch

    from prolip import pipeline
    from prolip.data.images import BadImageError
    from prolip.features import encode_images
    from prolip.run import Run, RunError

    try:
        run = Run.load(run_dir)
    except RunError as e:
        _fail(str(e))
    backbone = _backbone_for_run(run, device)
    method = pipeline.method_from_run(backbone, run)
    paths = [Path(p) for p in images]
    try:
        if tta:
            from prolip import tta as tta_mod

            logits = tta_mod.tta_logits(backbone, _adapted_W(method, run), backbone.projection().bias,
                                        run.classifier, float(run.manifest["logit_scale"]), paths,
                                        views=tta_views)
        else:
            logits = method.logits(encode_images(backbone, paths))
    except BadImageError as e:
        _fail(str(e))
    probs = logits.float().softmax(dim=-1)
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=-1)
    results = [{"image": str(p), "predictions": [{"class": run.classnames[int(i)], "index": int(i),
                                                   "probability": round(float(v), 6)}
                                                  for v, i in zip(vals, idx)]}
               for p, vals, idx in zip(paths, top.values, top.indices)]
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["image"])
        for pred in r["predictions"]:
            click.echo(f"  {pred['probability']*100:6.2f}%  {pred['class']}")


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory to write")
@click.option("--format", "fmt", type=click.Choice(["auto", "open_clip", "hf"]), default="auto", show_default=True,
              help="open_clip state dict (safetensors) or Hugging Face save_pretrained directory")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--device", default="cpu", show_default=True)
def export_cmd(run_dir, out, fmt, force, device):
    """Merge the adapted projection back into a standard CLIP checkpoint (+ the zero-shot head beside it)."""
    from prolip import export
    from prolip.run import Run, RunError

    try:
        run = Run.load(run_dir)
    except RunError as e:
        _fail(str(e))
    if out.exists() and not force:
        _fail(f"{out} already exists; pass --force to overwrite it")
    backbone = _backbone_for_run(run, device)
    W = _adapted_W(None, run)
    if fmt == "auto":
        fmt = "hf" if backbone.info.family == "hf" else "open_clip"
    try:
        if fmt == "hf":
            written = export.export_hf(backbone, W, out, force=force)
        else:
            out.mkdir(parents=True, exist_ok=True)
            written = export.export_open_clip(backbone, W, out / "open_clip_model.safetensors", force=force)
        export.save_classifier_head(run.classifier, run.classnames, run.templates, out, force=force)
    except (FileExistsError, ValueError) as e:
        _fail(str(e))
    click.echo(f"exported {fmt} checkpoint to {written}")


@click.command("extract")
@click.option("--data", required=True)
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="all", show_default=True)
@click.option("--views", default=300, show_default=True, help="augmented views per training image (0: center only)")
@click.option("--aug-seed", default=0, show_default=True)
@data_options
@cache_options
@backbone_options
def extract_cmd(data, split, views, aug_seed, data_root, classnames_file, templates_file, cache_dir, batch_size,
                workers, extract_dtype, on_bad_image, model, pretrained, device):
    """Fill the feature cache ahead of time (works under torchrun: images are sharded across processes)."""
    from prolip.features import extract_dataset

    splits = _resolve(data, data_root, classnames_file, templates_file)
    rank, world = init_from_env(device)
    backbone = _load_backbone(model, pretrained, device)
    wanted = ["train", "val", "test"] if split == "all" else [split]
    for name in wanted:
        images = getattr(splits, name)
        if images is None:
            continue
        paths = [it.path for it in images.items]
        stats = extract_dataset(backbone, paths, num_views=views if name == "train" else 0, cache_dir=cache_dir,
                                aug_seed=aug_seed, batch_size=batch_size, num_workers=workers,
                                on_bad_image=on_bad_image, compute_dtype=extract_dtype)
        who = f"rank {rank}/{world} " if world > 1 else ""
        click.echo(f"{who}{name}: {len(paths)} images, {stats}", err=True)


@click.command("methods")
def methods_cmd():
    """List the available adaptation methods."""
    from prolip.methods import available

    for name in available():
        click.echo(name)


def _report_skips(report: dict, datasets, on_bad_image: str, out: Path | None = None,
                  classnames=None) -> None:
    """Count and list, in ``report`` and on stderr, the files left out: never a silent change of the data.

    ``report`` already holds the cache's ``skipped_images`` ([path, reason]); the readers' ignored (non-image)
    files are added. A fit where skipping emptied a class's support set is refused: it would train a
    classifier that silently has one class fewer than the user's data.
    """
    ignored = sorted({str(p) for d in datasets if d is not None for p in getattr(d, "ignored_files", [])})
    report["ignored_files"] = ignored
    skipped = report.get("skipped_images", [])
    report["skipped_count"], report["ignored_count"] = len(skipped), len(ignored)
    where = f", listed in {out / 'manifest.json'}" if out is not None else ""
    if skipped:
        click.secho(f"skipped {len(skipped)} unreadable image(s) (--on-bad-image {on_bad_image}){where}:",
                    fg="yellow", err=True)
        _echo_some(f"{p}: {r}" for p, r in skipped)
    if ignored:
        click.secho(f"ignored {len(ignored)} non-image file(s) in the class folders{where}:", fg="yellow", err=True)
        _echo_some(ignored)
    support = report.get("data", {}).get("support")
    if support and skipped:
        bad = {p for p, _ in skipped}
        left = {}
        for path, label in support:
            left[label] = left.get(label, 0) + (path not in bad)
        empty = sorted(label for label, n in left.items() if n == 0)
        if empty:
            _fail(f"every support image of class(es) {[classnames[i] if classnames else i for i in empty]} is unreadable "
                  f"and was skipped, which would silently drop the class: replace those images (listed above) "
                  f"or remove the class folder")


def _echo_some(lines, limit: int = 20) -> None:
    lines = list(lines)
    for line in lines[:limit]:
        click.echo(f"  {line}", err=True)
    if len(lines) > limit:
        click.echo(f"  … and {len(lines) - limit} more", err=True)
