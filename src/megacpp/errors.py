"""The project's own error types.

`MegacppError` subclasses carry a message that names the file and the field
involved; the CLI prints the message alone and exits with code 2.
"""
from __future__ import annotations


class MegacppError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""


class RecipeError(MegacppError, ValueError):
    """A recipe (TOML file, preset or --set override) is invalid."""

    def __init__(self, message: str, field: str = "", file: str = "", line: int | None = None):
        self.field = field
        self.file = file
        self.line = line
        self.reason = message
        where = file or "<recipe>"
        if line is not None:
            where += f":{line}"
        text = f"{where}: {field}: {message}" if field else f"{where}: {message}"
        super().__init__(text)


class DataError(MegacppError, ValueError):
    """A data source, snapshot, shard or tokenizer is invalid."""


class NotImplementedFeature(MegacppError):
    """A recipe asks for a feature or layout this version does not implement."""
