"""Typed errors: every failure rehost reports has a stable code, a message and a hint.

The code and message are the contract users and the control plane match on; the
reason says what exactly went wrong; the hint says what to do about it.
"""

from __future__ import annotations

from typing import ClassVar


class RehostError(Exception):
    code: ClassVar[str] = "SYSTEM_ERROR"
    message: ClassVar[str] = "internal error"
    default_hint: ClassVar[str] = "this is a bug in rehost; please report it with the log"

    def __init__(self, reason: str = "", *, hint: str | None = None) -> None:
        self.reason = reason
        self.hint = hint or self.default_hint
        super().__init__(f"{self.message}: {reason}" if reason else self.message)

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "message": self.message,
            "reason": self.reason,
            "hint": self.hint,
        }


class SystemError_(RehostError):
    """Anything unexpected; the reason names the log to look at."""


class ImageMetadataError(RehostError):
    code = "IMAGE_METADATA_UNREADABLE"
    message = "failed to obtain the metadata of the image file"
    default_hint = (
        "check that the upload is complete and the image is not damaged; supported formats are "
        "qcow2, vhd, vhdx, vmdk (monolithicSparse, streamOptimized) and raw"
    )


SINGLE_FILE_HINT = (
    "an import is a single object: flatten the image into one self-contained file first, "
    "with qemu-img, which reads its other files: `qemu-img convert -O qcow2 SRC flat.qcow2` "
    "(rehost reads one file only, so `rehost image pack` refuses it too)"
)
ENCRYPTED_HINT = "decrypt the image first, e.g. `qemu-img convert --object secret,... -O qcow2`"


class ImageVerificationError(RehostError):
    code = "IMAGE_VERIFICATION_FAILED"
    message = "image file verification failed"
    default_hint = (
        "use a destination disk at least as large as the image's virtual size and file size"
    )


class DestinationError(RehostError):
    code = "DESTINATION_UNUSABLE"
    message = "the destination disk cannot be used"
    default_hint = "check that the destination path is a block device or a writable file"


class DestinationExpired(RehostError):
    code = "DESTINATION_EXPIRED"
    message = "the destination server has expired"
    default_hint = "renew the destination server or choose another one"


class SourceNotFound(RehostError):
    code = "SOURCE_NOT_FOUND"
    message = "the source image was not found"
    default_hint = "check the bucket, key or path, and that the upload finished"


class AccessDenied(RehostError):
    code = "ACCESS_DENIED"
    message = "access to the object store was denied"
    default_hint = (
        "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or the link's expiry"
    )


class SourceChanged(RehostError):
    code = "SOURCE_CHANGED"
    message = "the source object changed during the migration"
    default_hint = "do not overwrite the image while it is imported; start the import again"


class TaskTimeout(RehostError):
    code = "TASK_TIMEOUT"
    message = "the task timed out"
    default_hint = "raise the timeout, or run it again to resume from the last checkpoint"


class SourceUnusable(RehostError):
    code = "SOURCE_UNUSABLE"
    message = "the source server answered in a way rehost cannot use"
    default_hint = (
        "import from a server that answers ranged GETs (HTTP 206) with the object's own bytes, "
        "such as an S3-compatible object store, or through a presigned URL to one"
    )


class SourceUnavailable(RehostError):
    code = "SOURCE_UNAVAILABLE"
    message = "the source kept failing"
    default_hint = (
        "the storage kept failing or could not be reached; check that it is up and reachable "
        "from this server, then run the import again"
    )
