"""`prolip demo` (no arguments, no network) and `prolip pretrain-tiny` (the demo model's weights, regenerated)."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("prolip-demo"),
    show_default=True,
    help="where the digit folders, cache, run and plot are written",
)
@click.option("--model", default="ViT-B-16", show_default=True)
@click.option(
    "--pretrained",
    default="openai",
    show_default=True,
    help="real CLIP weights (tag or file); when they cannot be had, the in-house prolip-tiny model is used; "
    "'none' for random weights",
)
@click.option(
    "--views",
    default=8,
    show_default=True,
    type=click.IntRange(1, 300),
    help="augmented views per support image (kept small for CPU)",
)
def demo_cmd(workdir, model, pretrained, views):
    """ProLIP vs zero-shot, λ = 0 and two baselines on digits in two unseen domains at 1–16 shots; prints tables,
    writes a plot."""
    from prolip.demo import DemoConfig, run_demo

    started = time.perf_counter()
    result = run_demo(workdir, DemoConfig(model=model, pretrained=pretrained, views=views), echo=click.echo)
    click.echo("")
    click.echo(result["caption"])
    click.echo("")
    click.echo(result["table"])
    click.echo(f"plot: {result['plot']}   ({time.perf_counter() - started:.0f} s)")


@click.command("pretrain-tiny")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="folder for prolip-tiny-vit.safetensors (created if needed)",
)
@click.option("--seed", default=0, show_default=True, type=int, help="0 regenerates the shipped weights bit for bit")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--force", is_flag=True, help="replace OUT/prolip-tiny-vit.safetensors if pretrain-tiny wrote it")
def pretrain_tiny_cmd(out, seed, steps, force):
    """Pretrain prolip-tiny, the demo's small CLIP, contrastively on scikit-learn's digits (1–2 min on a CPU).

    The weights load like any checkpoint: `--model prolip-tiny-vit --pretrained OUT/prolip-tiny-vit.safetensors`.
    """
    from prolip.outputs import check_file, output_lock
    from prolip.tiny import (
        TINY_MODEL,
        PretrainConfig,
        held_out_zero_shot,
        is_tiny_weights,
        load_tiny,
        pretrain,
        save_tiny_weights,
    )

    target = out / f"{TINY_MODEL}.safetensors"
    # Refused before training, not after it: a file there that prolip did not write, or no folder to write in.
    click.get_current_context().with_resource(output_lock(target))
    check_file(target, force, is_ours=is_tiny_weights)
    config = PretrainConfig(seed=seed, steps=steps)
    started = time.perf_counter()
    click.echo(f"pretraining {TINY_MODEL} (seed {seed}, {steps} steps, one CPU thread) on scikit-learn's digits")
    state = pretrain(config, echo=click.echo)
    path = save_tiny_weights(state, target, config, force=force)
    backbone = load_tiny(path)
    click.echo(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s): "
        f"{backbone.info.describe()}; zero-shot {held_out_zero_shot(backbone):.1f}% on the held-out digits"
    )
