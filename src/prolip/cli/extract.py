"""`prolip extract`: fill the feature cache ahead of time (under torchrun, images are sharded across processes)."""

from __future__ import annotations

import click

from prolip.cli.options import (
    backbone_from_options,
    backbone_options,
    cache_options,
    check_device,
    fail,
    init_from_env,
    label_key_option,
    path_option,
    resolve,
)


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
    image_key,
    cache_dir,
    batch_size,
    workers,
    extract_dtype,
    on_bad_image,
    model,
    pretrained,
    device,
    site,
    engine=None,
):
    """Fill the feature cache ahead of time (works under torchrun: images are sharded across processes)."""
    from prolip.features import extract_dataset

    check_device(device)
    _check_engine(engine, device)
    splits = resolve(data, data_root, None, None, label_key=label_key, image_key=image_key, cache_dir=cache_dir)
    wanted = ["train", "val", "test"] if split == "all" else [split]
    if split != "all" and getattr(splits, split) is None:
        fail(
            f"--split {split}: --data {data} has no {split} split (a plain folder or list has only its images: "
            "use --split train or all)"
        )
    rank, world = init_from_env(device)
    backbone = backbone_from_options(model, pretrained, device, site)
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
            fail(f"--engine {engine} runs on the CPU; drop it or use --device cpu")
    except ValueError as e:  # unknown, or not installed
        fail(str(e))
