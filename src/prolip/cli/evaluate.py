"""`prolip eval`: a saved run on a dataset, its own images left out (inference.evaluate_run), printed or written."""

from __future__ import annotations

import json
from pathlib import Path

import click

from prolip.cli.options import (
    backbone_for_run,
    cache_options,
    check_device,
    data_read,
    echo_left_out,
    fail,
    feature_cache,
    label_key_option,
    load_run,
    path_option,
    reserve_out,
    resolve,
)


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
    image_key,
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
    run = load_run(run_dir)
    if out is not None:
        reserve_out(out, force, [*data_read(data, data_root, classnames_file), run_dir], "eval")
    splits = resolve(
        data, data_root, classnames_file, None, label_key=label_key, image_key=image_key, cache_dir=cache_dir
    )
    backbone = backbone_for_run(run, device)
    cache = None if tta else feature_cache(backbone, cache_dir, batch_size, workers, on_bad_image, extract_dtype)
    report = evaluate_run(
        run, splits, split=split, tta=TTAConfig(views=tta_views) if tta else None, backbone=backbone, cache=cache
    )
    report["run"] = str(run_dir)
    echo_left_out(report, on_bad_image)
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
        f"{'n/a' if mean is None else f'{mean:.2f}%'}  calibration error (ECE, 15 bins) {report['ece']:.2f}%"
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
        fail(str(e))
    click.echo(f"wrote {out / 'eval.json'}, per_class.csv and confusion_matrix.png", err=True)
