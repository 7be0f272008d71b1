"""The `prolip` command line: thin wrappers over the Python API."""

from __future__ import annotations

import click

from prolip import __version__

# Errors that mean "your input or environment is wrong", each with a message naming the file/option at fault:
# the user gets that message, not a traceback. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (
    ("prolip.features.storage", "CacheError"),
    ("prolip.data.images", "BadImageError"),
    ("prolip.data.folder", "DataError"),
    ("prolip.data.sampling", "NotEnoughImagesError"),
    ("prolip.run", "RunError"),
    ("prolip.backbones", "BackboneLoadError"),
    ("prolip.methods.params", "HyperparameterError"),
    ("prolip.methods.base", "FitError"),
    ("prolip.episode", "EpisodeError"),
    ("prolip.bench.experiment", "ExperimentError"),
    ("prolip.bench.records", "RecordsError"),
    ("prolip.outputs", "OutputError"),
)
# The library names values, not flags; where one option is the fix, the message says which.
_FLAG_FOR = {"CacheError": "--cache-dir"}


def _is_user_error(e: BaseException) -> bool:
    import sys

    # Looked up in sys.modules, so reporting a usage error never imports torch: an error of a class whose module
    # was never imported cannot have been raised.
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as e:
            if _is_user_error(e):
                flag = _FLAG_FOR.get(type(e).__name__)
                raise click.ClickException(f"{e} ({flag})" if flag else str(e)) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prolip")
def main() -> None:
    """Few-shot CLIP adaptation by fine-tuning the last visual projection (ProLIP)."""


from prolip.cli.commands import eval_cmd, export_cmd, extract_cmd, fit_cmd, methods_cmd, predict_cmd  # noqa: E402
from prolip.cli.demo import demo_cmd, pretrain_tiny_cmd  # noqa: E402

for _cmd in (fit_cmd, eval_cmd, predict_cmd, export_cmd, extract_cmd, methods_cmd, demo_cmd, pretrain_tiny_cmd):
    main.add_command(_cmd)

from prolip.cli.bench import bench_cmd, report_cmd  # noqa: E402

main.add_command(bench_cmd)
main.add_command(report_cmd)
