"""prolip's version (the same as pyproject.toml's), in a module of its own so that recording it in runs and bench
records imports nothing else of the package."""

__version__ = "0.1.0"
