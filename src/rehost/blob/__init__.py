"""Byte sources (local files, S3 objects and https URLs) behind one interface.

The remote sources live in `rehost.blob.s3` and `rehost.blob.https` and are imported
only when a location needs them (`open_source`): boto3 and urllib3 are slow to import.
"""

from rehost.blob.source import LocalFile, RangeSource, open_source

__all__ = ["LocalFile", "RangeSource", "open_source"]
