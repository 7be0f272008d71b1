"""The `prolip` command line: thin wrappers over the Python API."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import click

from prolip.errors import ProlipError
from prolip.version import __version__

BUG_MARK = "a bug in prolip"  # what every unexpected failure says, so a tally can tell a bug from a refusal
TRACEBACK_ENV = "PROLIP_TRACEBACK"  # set to 1: unexpected failures raise with their traceback (developers)


def _save_traceback(error: BaseException) -> str:
    """The traceback, written where the user can attach it to a report; where that fails, says so instead."""
    text = "".join(traceback.format_exception(error))
    command = " ".join(["prolip", *sys.argv[1:]])
    try:
        fd, path = tempfile.mkstemp(prefix="prolip-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"prolip {__version__}\n{command}\n\n{text}")
    except OSError as e:  # a full or read-only temp dir: the one line must still come out
        return f"the traceback could not be saved ({e.strerror}); rerun with {TRACEBACK_ENV}=1 to see it"
    return f"the traceback is in {path}"


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):  # click's own ends: --help, Ctrl-C
            raise
        except Exception as e:
            if isinstance(e, ProlipError):  # the input or environment is wrong: one line, naming what
                raise click.ClickException(f"{e} ({e.option})" if e.option else str(e)) from None
            if os.environ.get(TRACEBACK_ENV) == "1":
                raise
            raise click.ClickException(
                f"{type(e).__name__}: {e} -- this is {BUG_MARK}, not in your input; please report it with the "
                f"command you ran ({_save_traceback(e)})"
            ) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prolip")
def main() -> None:
    """Few-shot CLIP adaptation by fine-tuning the last visual projection (ProLIP)."""


from prolip.cli.demo import demo_cmd, pretrain_tiny_cmd  # noqa: E402
from prolip.cli.evaluate import eval_cmd  # noqa: E402
from prolip.cli.export import export_cmd  # noqa: E402
from prolip.cli.extract import extract_cmd  # noqa: E402
from prolip.cli.fit import fit_cmd  # noqa: E402
from prolip.cli.methods import methods_cmd, models_cmd  # noqa: E402
from prolip.cli.predict import predict_cmd  # noqa: E402

_COMMANDS = (
    fit_cmd,
    eval_cmd,
    predict_cmd,
    export_cmd,
    extract_cmd,
    methods_cmd,
    models_cmd,
    demo_cmd,
    pretrain_tiny_cmd,
)
for _cmd in _COMMANDS:
    main.add_command(_cmd)

from prolip.cli.bench import bench_cmd, report_cmd  # noqa: E402

main.add_command(bench_cmd)
main.add_command(report_cmd)
