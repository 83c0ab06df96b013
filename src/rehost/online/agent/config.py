"""The agent's JSON config: loaded strictly, so a typo is an error and not a silent default.

Runs on the source server (Python 3.6+, standard library only). Every problem raises
AgentError with code CONFIG_INVALID and names the offending key, because a mistyped
`Excludes` or `DataDisks` would otherwise migrate the wrong data without a word.
"""

import json
import os
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from rehost.online.agent.layout import _relative, _under, active_swaps, host_path
from rehost.online.protocol import AgentError

DEFAULT_PORT = 443
COMPRESSIONS = ("auto", "zstd", "off")
DEFAULT_EXCLUDES = [
    "/dev/*",
    "/proc/*",
    "/sys/*",
    "/run/*",
    "/tmp/*",
    "/lost+found/*",
    "/var/cache/yum/*",
    "/var/cache/dnf/*",
    "/var/lib/lxcfs/*",
]


class DataDisk(NamedTuple):
    number: int  # the destination data disk (Index)
    mount_point: str


class Config(NamedTuple):
    path: str  # the config file, absolute: log/ and state/ live beside it
    address: str  # "host:port" as given, port filled in
    host: str
    port: int
    token: str
    fingerprint: str  # sha256 hex, lowercase, no colons
    data_disks: List[DataDisk]
    excludes: List[str]  # the user's additions only; see effective_excludes()
    bandwidth_kbps: int
    compression: str
    proxy: Optional[str]

    @property
    def base_dir(self) -> str:
        return os.path.dirname(self.path)


HINT = "fix the config file; docs/agent-config.md lists every key with an example"
_SCHEMA = {
    "": ("Destination", "DataDisks", "Excludes", "BandwidthLimitKBps", "Compression", "Proxy"),
    "Destination": ("Address", "Token", "Fingerprint"),
    "DataDisks[]": ("Index", "MountPoint"),
}


def _invalid(message: str) -> AgentError:
    return AgentError("CONFIG_INVALID", message, HINT)


def _object(value: Any, where: str, schema: str, required: Tuple[str, ...]) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object, not {_kind(value)}")
    for key in value:
        if key not in _SCHEMA[schema]:
            raise _invalid(
                "unknown key {!r} in {} (known: {})".format(key, where, ", ".join(_SCHEMA[schema]))
            )
    for key in required:
        if key not in value:
            raise _invalid(f"missing key {key!r} in {where}")
    return value


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid(f"{where} must be a non-empty string, not {_kind(value)}")
    return value


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{where} must be an integer, not {_kind(value)}")
    if value < minimum:
        raise _invalid(f"{where} must be at least {minimum}, not {value}")
    return value


def split_address(value: str, where: str, default_port: Optional[int]) -> Tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port); the port is required without a default."""
    match = re.match(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:/\s]+))(?::(\d{1,5}))?$", value)
    if not match:
        raise _invalid(f"{where} must be host:port, not {value!r}")
    host = match.group(1) or match.group(2)
    if match.group(3) is None:
        if default_port is None:
            raise _invalid(f"{where} needs a port (host:port), not {value!r}")
        return host, default_port
    port = int(match.group(3))
    if not 0 < port < 65536:
        raise _invalid(f"{where} has an invalid port {port}")
    return host, port


def parse(raw: Any, path: str) -> Config:
    """Validate a decoded config document; `path` is where it came from (made absolute)."""
    top = _object(raw, "the config", "", ("Destination",))
    dest = _object(top["Destination"], "Destination", "Destination", _SCHEMA["Destination"])
    host, port = split_address(
        _string(dest["Address"], "Destination.Address"), "Destination.Address", DEFAULT_PORT
    )
    token = _string(dest["Token"], "Destination.Token")
    fingerprint = _string(dest["Fingerprint"], "Destination.Fingerprint").replace(":", "").lower()
    if not re.match(r"^[0-9a-f]{64}$", fingerprint):
        raise _invalid(
            "Destination.Fingerprint must be the receiver's sha256 fingerprint "
            "(64 hex digits, as printed by `rehost receive`)"
        )

    disks_raw = top.get("DataDisks", [])
    if not isinstance(disks_raw, list):
        raise _invalid(f"DataDisks must be a list, not {_kind(disks_raw)}")
    data_disks = []  # type: List[DataDisk]
    for n, item in enumerate(disks_raw):
        where = f"DataDisks[{n}]"
        entry = _object(item, where, "DataDisks[]", _SCHEMA["DataDisks[]"])
        index = _integer(entry["Index"], where + ".Index", 1)
        mount = _string(entry["MountPoint"], where + ".MountPoint")
        if not mount.startswith("/") or mount == "/":
            raise _invalid(f"{where}.MountPoint must be an absolute path other than /")
        mount = os.path.normpath(mount)
        for other in data_disks:
            if other.mount_point == mount:
                raise _invalid(f"{where}.MountPoint {mount} is listed twice")
        data_disks.append(DataDisk(index, mount))

    excludes_raw = top.get("Excludes", [])
    if not isinstance(excludes_raw, list):
        raise _invalid(f"Excludes must be a list, not {_kind(excludes_raw)}")
    excludes = []  # type: List[str]
    for n, pattern in enumerate(excludes_raw):
        pattern = _string(pattern, f"Excludes[{n}]")
        if not pattern.startswith("/"):
            raise _invalid(
                f"Excludes[{n}] must be an absolute pattern such as /var/tmp/*, not {pattern!r}"
            )
        excludes.append(pattern)

    bandwidth = _integer(top.get("BandwidthLimitKBps", 0), "BandwidthLimitKBps", 0)
    compression = top.get("Compression", "auto")
    if compression not in COMPRESSIONS:
        raise _invalid(
            "Compression must be one of {}, not {!r}".format(", ".join(COMPRESSIONS), compression)
        )
    proxy = None  # type: Optional[str]
    if top.get("Proxy") is not None:
        proxy_host, proxy_port = split_address(_string(top["Proxy"], "Proxy"), "Proxy", None)
        proxy = f"{proxy_host}:{proxy_port}"
    shown_host = f"[{host}]" if ":" in host else host
    return Config(
        path=os.path.abspath(path),
        address=f"{shown_host}:{port}",
        host=host,
        port=port,
        token=token,
        fingerprint=fingerprint,
        data_disks=data_disks,
        excludes=excludes,
        bandwidth_kbps=bandwidth,
        compression=compression,
        proxy=proxy,
    )


def load(path: str) -> Config:
    """Read and validate the config file at `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise AgentError(
            "CONFIG_INVALID",
            f"cannot read the config file {path}: {e.strerror or e}",
            "pass --config with the path of the agent's JSON config",
        ) from e
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise _invalid(f"{path} is not valid JSON: {e}") from e
    return parse(raw, path)


def _as_source(path: str, source_root: str) -> Optional[str]:
    """`path` (as the host sees it) as the source sees it, or None when outside source_root.
    Both are resolved: the walk sees real paths, so an agent folder reached through a symlink
    (/root/agent -> /opt/rehost-agent) would not be excluded by its link's name."""
    root, path = os.path.realpath(source_root), os.path.realpath(path)
    return _relative(path, root) if _under(path, root) else None


def swap_files(proc_swaps: str = "/proc/swaps") -> List[str]:
    """Active swap files (not partitions) from /proc/swaps, as host paths."""
    return [host_path(name) for name, kind, _ in active_swaps(proc_swaps) if kind == "file"]


def effective_excludes(
    config: Config, source_root: str, agent_dirs: List[str], proc_swaps: str = "/proc/swaps"
) -> List[str]:
    """Defaults + the user's patterns + swap files + the agent's own folders, as source paths.

    Host paths outside source_root (e.g. the host's swap when testing on a tree) do not apply.
    """
    result = list(DEFAULT_EXCLUDES)
    for swap in swap_files(proc_swaps):
        inner = _as_source(swap, source_root)
        if inner is not None:
            result.append(inner)
    for folder in agent_dirs:
        inner = _as_source(folder, source_root)
        if inner is not None and inner != "/" and inner not in result:
            result.append(inner)
    for pattern in config.excludes:
        if pattern not in result:
            result.append(pattern)
    return result


def excludes_for_mount(excludes: List[str], mount: str) -> List[str]:
    """The patterns that apply inside the filesystem mounted at `mount`, relative to it.

    `/data/cache/*` becomes `/cache/*` for the filesystem at /data; the root filesystem gets
    every pattern (sync_filesystem does not cross into other mounts).
    """
    if mount == "/":
        return list(excludes)
    prefix = mount.rstrip("/") + "/"
    return ["/" + p[len(prefix) :] for p in excludes if p.startswith(prefix)]
