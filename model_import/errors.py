"""The one error type of the importer: its message names the file and what is wrong with it."""

from __future__ import annotations


class ModelImportError(Exception):
    """Bad input (checkpoint, dataset, models folder); the CLI prints the message and exits 2."""
