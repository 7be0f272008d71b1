"""The `prolip` command line: thin wrappers over the Python API."""

from __future__ import annotations

import click

from prolip.errors import ProlipError
from prolip.version import __version__


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as e:
            if isinstance(e, ProlipError):  # the input or environment is wrong: one line, naming what
                raise click.ClickException(f"{e} ({e.option})" if e.option else str(e)) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prolip")
def main() -> None:
    """Few-shot CLIP adaptation by fine-tuning the last visual projection (ProLIP)."""


from prolip.cli.demo import demo_cmd, pretrain_tiny_cmd  # noqa: E402
from prolip.cli.evaluate import eval_cmd  # noqa: E402
from prolip.cli.export import export_cmd  # noqa: E402
from prolip.cli.extract import extract_cmd  # noqa: E402
from prolip.cli.fit import fit_cmd  # noqa: E402
from prolip.cli.methods import methods_cmd  # noqa: E402
from prolip.cli.predict import predict_cmd  # noqa: E402

for _cmd in (fit_cmd, eval_cmd, predict_cmd, export_cmd, extract_cmd, methods_cmd, demo_cmd, pretrain_tiny_cmd):
    main.add_command(_cmd)

from prolip.cli.bench import bench_cmd, report_cmd  # noqa: E402

main.add_command(bench_cmd)
main.add_command(report_cmd)
