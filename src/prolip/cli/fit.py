"""`prolip fit`: cache features, train a method on N shots per class, evaluate, save a run (pipeline.fit)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from prolip.choices import SAMPLERS
from prolip.cli.options import (
    backbone_from_options,
    backbone_options,
    cache_options,
    check_device,
    data_options,
    data_read,
    echo_left_out,
    fail,
    feature_cache,
    hyperparameters_from,
    init_from_env,
    label_key_option,
    path_option,
    reserve_out,
    resolve,
)


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
    type=click.Choice(SAMPLERS),
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
    "--split-file",
    help="train on the support images a published split names instead of sampling them (2SFS's "
    "shot_K-seed_S_train.jsonl; --shots must be its K)",
)
@path_option("--split-val-file", help="with --split-file: the validation images of that split (…_val.jsonl)")
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
    split_file,
    split_val_file,
    val_dir,
    aug_seed,
    out,
    force,
    as_json,
    label_key,
    image_key,
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
    site,
):
    """Cache features, train a method on N shots per class, evaluate, and save a run directory."""
    from prolip import pipeline, runcard
    from prolip.methods import configure

    hp = hyperparameters_from({"lr": lr, "lam": lam, "steps": steps, "precision": precision}, hp_pairs)
    check_device(device)
    configure(method, hp, validate=validate)  # a bad method or hyperparameter fails before any work
    reserve_out(out, force, data_read(data, data_root, classnames_file, templates_file, val_dir), "run")
    splits = resolve(
        data, data_root, classnames_file, templates_file, train_split, label_key, image_key, cache_dir=cache_dir
    )
    eval_images = _val_images(val_dir, classnames_file)
    rank, _ = init_from_env(device)  # under torchrun: extraction and the grid search are split across processes
    backbone = backbone_from_options(model, pretrained, device, site)
    cache = feature_cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype)
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
        split_file=None if split_file is None else str(split_file),
        split_val_file=None if split_val_file is None else str(split_val_file),
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
        fail(str(e))
    echo_left_out(result.run.manifest, on_bad_image, out)
    if rank == 0:  # every rank holds the same result; one writes it
        try:
            result.run.save(out, force=force)
        except ValueError as e:  # OutputError, or a run that could not be loaded back (NaN weights)
            fail(str(e))
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
