"""The ``updp`` command line (top layer): argument parsing and printing over the pipeline."""
from updp.cli.main import main

__all__ = ["main"]
