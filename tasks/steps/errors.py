"""Errors that end a pipeline on purpose, with messages a user can act on."""

from __future__ import annotations


class DataValidationError(ValueError):
    """Input data broke a rule. Never retried: running again cannot fix the data."""

    def __init__(self, file: str, rule: str, column: str | None = None) -> None:
        self.file = file
        self.column = column
        self.rule = rule
        where = f"column {column!r} of {file}" if column else file
        super().__init__(f"{where}: {rule}")

    def __reduce__(self):  # survives the trip back from a Dask worker
        return (type(self), (self.file, self.rule, self.column))


def read_failure(exc: BaseException) -> str:
    """A reader's exception in words that quote nothing from the file: its type, and the line or row it
    names (parsers put the offending row itself in their messages, and a file may hold a secret)."""
    import re

    where = re.search(r"\b(line|row)s? (\d+)", str(exc))
    return type(exc).__name__ + (f" at {where.group(1)} {where.group(2)}" if where else "")


class StepFailed(RuntimeError):
    """Raised by a FailStep: the pipeline execution ends as Failed with this message."""


class NotInRegistry(LookupError):
    """The model, version or lineage a flow needs is not in the MLflow registry."""
