"""The offline import task: an image from a path, S3 or an https URL onto a disk, resumably."""

from rehost.offline.state import ImportState, StateDir, StateDirInUse, default_state_dir
from rehost.offline.task import ImportReport, run_import

__all__ = [
    "ImportReport",
    "ImportState",
    "StateDir",
    "StateDirInUse",
    "default_state_dir",
    "run_import",
]
