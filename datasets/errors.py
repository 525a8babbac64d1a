"""Errors raised for bad datasets or storage. Each message names the file/URL and the field or value."""


class DatasetError(ValueError):
    """A dataset (manifest, part, raw layout) is malformed or inconsistent."""


class StorageError(OSError):
    """Object storage could not be reached, or refused access."""


class StorageURLError(DatasetError):
    """A dataset or storage URL is malformed (`s3:/b/p`, `s3://`) or names a scheme no filesystem serves. A
    ValueError, not an OSError: never retried as a storage outage."""
