"""Errors the CLI shows as one line (no traceback unless --debug)."""

from platebench.datasets.errors import DatasetError, StorageError
from platebench.methods.base import MethodError


class HarnessError(ValueError):
    """Bad configuration or input caught by the harness (suite file, run spec, records, flags)."""


USER_ERRORS = (HarnessError, DatasetError, StorageError, MethodError)
