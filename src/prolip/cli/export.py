"""`prolip export`: what a run adapted, merged into a standard open_clip or Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from prolip.cli.options import backbone_for_run, check_device, fail, load_run, reserve_out


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
    """Merge what the run adapted (projection, fine-tuned encoder) into a standard CLIP checkpoint (+ the head the
    run predicts with beside it: the zero-shot one, or the method's own)."""
    from prolip import export, inference

    check_device(device)
    run = load_run(run_dir)
    reserve_out(out, force, [run_dir], "export")
    backbone = backbone_for_run(run, device)
    method = inference.method_from_run(backbone, run)
    tensors = inference.checkpoint_tensors(method, run, backbone)
    if fmt == "auto":
        fmt = backbone.family.export_format
    try:
        # One folder, written whole: the checkpoint, the head the run predicts with and the run card.
        written = export.export_folder(
            backbone,
            tensors,
            out,
            fmt=fmt,
            head=inference.export_head(method, run),
            card=run.card,
            force=force,
            data_paths=[run_dir],
        )
    except (FileExistsError, ValueError) as e:
        fail(str(e))
    click.echo(f"exported {fmt} checkpoint to {written}")
