"""`prolip demo`: no arguments, no network."""
from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("prolip-demo"), show_default=True,
              help="where the digits folder, cache, run and plot are written")
@click.option("--model", default="ViT-B-16", show_default=True)
@click.option("--pretrained", default="openai", show_default=True)
@click.option("--views", default=4, show_default=True, help="augmented views per support image (kept small for CPU)")
def demo_cmd(workdir, model, pretrained, views):
    """ProLIP vs zero-shot on scikit-learn's bundled digits at 1/2/4/8/16 shots; prints a table, writes a plot."""
    from prolip.demo import DemoConfig, run_demo

    started = time.perf_counter()
    result = run_demo(workdir, DemoConfig(model=model, pretrained=pretrained, views=views), echo=click.echo)
    click.echo("")
    click.echo(result["caption"])
    click.echo(result["table"])
    click.echo(f"plot: {result['plot']}   16-shot run: {result['run']}   ({time.perf_counter() - started:.0f} s)")
