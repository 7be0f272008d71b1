"""The `prolip` command line: thin wrappers over the Python API."""
from __future__ import annotations

import click

from prolip import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prolip")
def main() -> None:
    """Few-shot CLIP adaptation by fine-tuning the last visual projection (ProLIP)."""
