"""`prolip methods` and `prolip models`: the registered adaptation methods (their hyperparameters and what each
can do) and the architectures prolip can adapt (their projection sites)."""

from __future__ import annotations

import click


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
            can_do = cls.capabilities
            click.echo(f"  selects on validation: {can_do.selects or 'nothing (validation-free)'}")
            can = [
                what
                for what, flag in (
                    ("scores other class sets", can_do.accepts_classifier),
                    ("exposes an adapted projection (TTA)", can_do.exposes_projection),
                    ("trains inside the image encoder", can_do.encodes_images),
                    ("uses the text side", can_do.uses_text_side),
                )
                if flag
            ]
            click.echo(f"  can: {', '.join(can) or '-'}")


@click.command("models")
@click.argument("match", required=False, default="")
def models_cmd(match):
    """List every open_clip architecture prolip can adapt (those whose name contains MATCH): its family, its native
    projection site or "output only", and the weight tags open_clip knows for it."""
    import open_clip

    from prolip.backbones.coverage import coverage_of, report

    archs = [a for a in open_clip.list_models() if match.lower() in a.lower()]
    if not archs:
        raise click.BadParameter(f"no open_clip architecture contains {match!r}", param_hint="MATCH")
    click.echo(report([coverage_of(a) for a in archs]))
