"""Byte sources (local files, S3 objects and https URLs) behind one interface."""

from rehost.blob.https import HttpsSource
from rehost.blob.readahead import ReadAheadSource, RetryPolicy
from rehost.blob.s3 import S3Source
from rehost.blob.source import LocalFile, RangeSource, open_source

__all__ = [
    "HttpsSource",
    "LocalFile",
    "RangeSource",
    "ReadAheadSource",
    "RetryPolicy",
    "S3Source",
    "open_source",
]
