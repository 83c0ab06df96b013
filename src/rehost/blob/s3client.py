"""One place that builds S3 clients the standard way, for reads and uploads alike.

Credentials, region and endpoint come from the standard AWS variables and files;
REHOST_S3_ADDRESSING=path|virtual|auto picks the addressing style, where `auto`
means path style when an endpoint URL is set (what most S3-compatible stores
want) and boto3's own choice otherwise.

Clients come from botocore, boto3's engine, without boto3 itself: boto3 adds its
resource layer and s3transfer, which rehost does not use, and ~0.15 s of import
and set-up to every command that touches S3. Configuration is botocore's, so it
is the same as boto3's.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal, cast

from rehost.errors import SystemError_

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


DENIED_CODES = frozenset(
    {
        "401",
        "403",
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
"""S3 error codes that mean the credentials or the link were refused: never retried."""


def addressing_style() -> Literal["path", "virtual", "auto"]:
    style = os.environ.get("REHOST_S3_ADDRESSING", "auto").strip().lower() or "auto"
    if style not in ("path", "virtual", "auto"):
        raise SystemError_(
            f"REHOST_S3_ADDRESSING={style!r} is not path, virtual or auto",
            hint="set REHOST_S3_ADDRESSING to path, virtual or auto (the default)",
        )
    if style == "auto" and (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    ):
        return "path"
    return cast(Literal["path", "virtual", "auto"], style)


def make_client(
    max_connections: int = 16, *, botocore_retries: bool = False, read_timeout: float = 30
) -> S3Client:
    """An S3 client from the environment.

    Readers keep botocore's retries off because they have one retry budget of their
    own; uploads use botocore's standard mode (8 attempts, backoff on throttling,
    5xx and connection errors).
    """
    import botocore.session
    from botocore.config import Config

    config = Config(
        # On an http:// endpoint botocore would sha256 every body for the signature, a
        # third pass over each byte; bodies carry a signed Content-MD5 or CRC32C instead.
        s3={"addressing_style": addressing_style(), "payload_signing_enabled": False},
        retries={"mode": "standard", "max_attempts": 8}
        if botocore_retries
        else {"total_max_attempts": 1},
        max_pool_connections=max_connections,
        connect_timeout=10,
        read_timeout=read_timeout,
        # Not every S3-compatible store understands the newer flexible-checksum headers;
        # uploads choose per store (blob/upload.py), and ranged reads cannot use a
        # whole-object sum.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    # A session of our own: a shared one is not thread-safe to create clients from.
    session = botocore.session.Session()
    return cast("S3Client", session.create_client("s3", region_name=region, config=config))
