"""Byte sources (local files, and later S3 objects and https URLs) behind one interface."""

from rehost.blob.source import LocalFile, RangeSource, open_source

__all__ = ["LocalFile", "RangeSource", "open_source"]
