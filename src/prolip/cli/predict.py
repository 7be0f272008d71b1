"""`prolip predict`: top-k classes of image files with a saved run (Run.predict)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from prolip.cli.options import backbone_for_run, check_device, load_run


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
    run = load_run(run_dir)
    backbone = backbone_for_run(run, device)
    config = TTAConfig(views=tta_views) if tta else None
    results = run.predict([Path(p) for p in images], top_k=top_k, tta=config, backbone=backbone)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["image"])
        for pred in r["predictions"]:
            click.echo(f"  {pred['probability'] * 100:6.2f}%  {pred['class']}")
