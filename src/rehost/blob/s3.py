"""An S3 object as a RangeSource: ranged GETs (botocore) through the shared read-ahead cache.

The image readers see nothing but `RangeSource`, so an image streams from object
storage straight onto the destination disk with no staging copy: the converter
asks for byte ranges, this source turns them into ranged `GetObject` calls
(chunked, prefetched and retried by `ReadAheadSource`).

Why ETag pinning: an import reads the object over minutes or hours, in many
requests. If someone overwrites the object meanwhile, a naive reader would
stitch a disk together from two different images and report success. So the
object is HEADed once at open (size and ETag) and every ranged GET carries
`If-Match: <etag>`: a replaced object answers 412 (and an ETag that differs in
a response is caught too), which is raised as `SourceChanged`.

Configuration is the standard one, so the same environment works for the AWS
CLI: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN),
AWS_ENDPOINT_URL (read by botocore itself), AWS_REGION or AWS_DEFAULT_REGION.
REHOST_S3_ADDRESSING=path|virtual|auto picks the addressing style; `auto`
means path-style when an endpoint URL is set (most S3-compatible stores,
SeaweedFS and MinIO among them, expect it) and botocore's choice otherwise.
Botocore's own retries are off: `RetryPolicy` retries, with one budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rehost.blob.readahead import (
    DEFAULT_CACHE,
    DEFAULT_CHUNK,
    DEFAULT_READAHEAD,
    ReadAheadSource,
    RetryPolicy,
    Transient,
    describe,
)
from rehost.blob.s3client import DENIED_CODES, make_client
from rehost.errors import AccessDenied, RehostError, SourceChanged, SourceNotFound, SystemError_

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
    "credentials), that they may read this object, and that AWS_ENDPOINT_URL points at the "
    "right store"
)
_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchBucket", "NoSuchVersion"}
_TRANSIENT = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "503",
    "500",
}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET/KEY` → (bucket, key); the key is taken literally, slashes and all."""
    if not url.startswith("s3://"):
        raise SourceNotFound(f"{url}: not an s3://BUCKET/KEY location")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise SourceNotFound(
            f"{url}: an S3 location is s3://BUCKET/KEY", hint="name both the bucket and the key"
        )
    return bucket, key


class S3Source(ReadAheadSource):
    """An S3 object read by ranged GETs pinned to the ETag it had at open.

    `S3Source(bucket, key)` or `S3Source.from_url("s3://bucket/key")`; keyword
    arguments `client` (an S3 client; default: from the environment),
    `chunk_size`, `readahead`, `cache_bytes`, `retry` and `deadline` (see `ReadAheadSource`:
    no request or backoff past it; a request already sent is bounded by botocore's timeouts).
    `etag` is the pinned ETag, `last_modified` (ISO 8601) and `version_id` (None unless
    the bucket is versioned) identify the object further; counters `bytes_fetched`,
    `requests`, `retries`.
    """

    def __init__(
        self,
        bucket: str,
        key: str,
        *,
        client: S3Client | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        readahead: int = DEFAULT_READAHEAD,
        cache_bytes: int = DEFAULT_CACHE,
        retry: RetryPolicy | None = None,
        deadline: float | None = None,
    ) -> None:
        super().__init__(
            chunk_size=chunk_size,
            readahead=readahead,
            cache_bytes=cache_bytes,
            retry=retry,
            deadline=deadline,
        )
        self.bucket = bucket
        self.key = key
        self._name = f"s3://{bucket}/{key}"
        self._size = 0
        self.etag = ""
        self.last_modified: str | None = None
        self.version_id: str | None = None
        try:
            self._client = client or make_client(max(16, 2 * self.readahead + 8))
            head = self._retrying(self._head, f"{self._name}: HEAD")
        except BaseException:
            super().close()
            raise
        self._size = int(head["ContentLength"])
        self.etag = str(head.get("ETag") or "")
        modified = head.get("LastModified")
        self.last_modified = modified.isoformat() if modified else None
        self.version_id = head.get("VersionId")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Source:
        bucket, key = parse_s3_url(url)
        return cls(bucket, key, **kwargs)

    def _head(self) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        self._count_request()
        try:
            return dict(self._client.head_object(Bucket=self.bucket, Key=self.key))
        except ClientError as e:
            err = self._map_client_error(e)
            if isinstance(err, SourceNotFound) and not self._bucket_exists():
                err = SourceNotFound(f"{self._name}: the bucket {self.bucket!r} does not exist")
            raise err from e
        except Exception as e:
            raise self._map_other(e) from e

    def _bucket_exists(self) -> bool:
        """HEAD answers a bare 404 for a missing bucket and a missing key alike: tell them apart."""
        from botocore.exceptions import ClientError

        self._count_request()
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            return self._status(e) != 404
        except Exception:
            return True
        return True

    def _fetch(self, start: int, sizes: Sequence[int], deliver: Callable[[bytes], None]) -> None:
        from botocore.exceptions import ClientError

        self._count_request()
        end = start + sum(sizes) - 1
        try:
            pin: dict[str, Any] = {"IfMatch": self.etag} if self.etag else {}
            resp = self._client.get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end}", **pin
            )
            body = resp["Body"]
            try:
                got = resp.get("ETag")
                if self.etag and got and got != self.etag:
                    raise self._changed(got)
                self._read_body(body.read, sizes, deliver)
            finally:
                body.close()
        except ClientError as e:
            raise self._map_client_error(e, reading=True) from e
        except RehostError:
            raise
        except Exception as e:
            raise self._map_other(e) from e

    def _changed(self, new_etag: str | None) -> SourceChanged:
        return SourceChanged(
            f"{self._name} was replaced during the import "
            f"(ETag {self.etag} → {new_etag or 'a different version'})"
        )

    def _current_etag(self) -> str | None:
        """Best effort, for the message only: the ETag the object has now."""
        try:
            self._count_request()
            return str(self._client.head_object(Bucket=self.bucket, Key=self.key).get("ETag"))
        except Exception:
            return None

    @staticmethod
    def _status(e: Any) -> int:
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)

    def _map_client_error(self, e: Any, *, reading: bool = False) -> Exception:
        """A botocore ClientError → a typed error, or `Transient` when worth retrying.

        `reading`: the object was there at open, so a 404 means it was deleted since.
        """
        err = e.response.get("Error", {})
        code = str(err.get("Code") or "")
        status = self._status(e)
        if code == str(status) or not code:  # HEAD has no body: only the status
            text = f"HTTP {status} {err.get('Message') or ''}".strip()
        else:
            text = f"{code}: {err.get('Message') or 'no message'} (HTTP {status})"
        if code in _NOT_FOUND or status == 404:
            if reading:
                return SourceNotFound(f"{self._name} was deleted during the import ({text})")
            if code == "NoSuchBucket":
                return SourceNotFound(f"{self._name}: the bucket {self.bucket!r} does not exist")
            return SourceNotFound(f"{self._name}: no such object ({text})")
        if code in DENIED_CODES or status in (401, 403):
            return AccessDenied(f"{self._name}: {text}", hint=CREDENTIALS_HINT)
        if code == "PreconditionFailed" or status == 412:
            return self._changed(self._current_etag())
        if code == "InvalidRange" or status == 416:
            return SourceChanged(f"{self._name} became shorter during the import ({text})")
        if code in _TRANSIENT or status >= 500 or status in (408, 429):
            return Transient(f"{self._name}: {text}")
        hint = None
        if code in ("AuthorizationHeaderMalformed", "PermanentRedirect", "301", "400"):
            hint = "check AWS_REGION/AWS_DEFAULT_REGION, AWS_ENDPOINT_URL and REHOST_S3_ADDRESSING"
        return SystemError_(f"{self._name}: unexpected S3 error {text}", hint=hint)

    def _map_other(self, e: Exception) -> Exception:
        from botocore import exceptions as bx
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return AccessDenied(f"{self._name}: {describe(e)}", hint=CREDENTIALS_HINT)
        transient = (
            bx.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, proxy errors
            bx.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
            bx.IncompleteReadError,
            Urllib3Error,
            OSError,
        )
        if isinstance(e, transient):
            return Transient(f"{self._name}: {describe(e)}")
        if isinstance(e, RehostError):
            return e
        return SystemError_(f"{self._name}: {describe(e)}")
