"""Stage 1 prechecks: everything that can be known before a byte is copied, in one report.

Runs on the source server (Python 3.6+, standard library only). Each check is OK, WARN or
FAIL; any FAIL stops `--stage prepare`, so a migration that cannot succeed (too small a
destination, an unsupported layout, a wrong fingerprint) fails before it changes anything.
"""

import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from rehost.online.agent.config import Config
from rehost.online.protocol import AgentError, MiB, align_down, disk_need, usable_bytes

OK = "OK"
WARN = "WARN"
FAIL = "FAIL"
ESSENTIAL_MOUNTS = ("/boot", "/usr", "/var")  # besides /, which is always migrated
DEST_SECTOR = 512  # from a receiver older than the hello's "sector"
SKEW_WARN_SECONDS = 5.0
STATE_MIN_FREE = 50 * MiB
RHEL_IDS = ("rhel", "centos", "rocky", "almalinux", "fedora", "ol", "amzn", "scientific")
DEBIAN_IDS = ("debian", "ubuntu", "raspbian", "linuxmint")


class Check(NamedTuple):
    name: str
    status: str  # OK | WARN | FAIL
    message: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.message}"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe_error(exc: BaseException) -> str:
    """`CODE: message` for typed errors (ours or the client's), else the exception's text."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return "{}: {}".format(code, getattr(exc, "message", None) or exc)
    return f"{type(exc).__name__}: {exc}"


def os_family(source_root: str) -> Tuple[str, str]:
    """('rhel'|'debian'|'', pretty name) from the source's /etc/os-release."""
    fields = {}  # type: Dict[str, str]
    for name in ("etc/os-release", "usr/lib/os-release"):
        try:
            with open(os.path.join(source_root, name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, sep, value = line.strip().partition("=")
                    if sep:
                        fields[key] = value.strip().strip("\"'")
            break
        except OSError:
            continue
    ids = [fields.get("ID", "").lower(), *fields.get("ID_LIKE", "").lower().split()]
    pretty = fields.get("PRETTY_NAME") or fields.get("ID") or "unknown"
    if any(i in RHEL_IDS for i in ids):
        return "rhel", pretty
    if any(i in DEBIAN_IDS for i in ids):
        return "debian", pretty
    return "", pretty


def _disk_of(layout: Dict[str, Any], mount: str) -> Optional[str]:
    for m in layout.get("mounts", []):
        if m.get("mount") == mount and m.get("disk") is not None:
            return str(m["disk"])
    return None


def plan_disks(config: Config, layout: Dict[str, Any]) -> Tuple[Dict[str, int], List[Check]]:
    """Map source disks to destination disks: the one holding / is 0, DataDisks name the rest.

    A data disk entry maps the whole source disk holding its MountPoint (its partition
    table is recreated); mounts on unmapped disks are left out with a warning.
    """
    checks = []  # type: List[Check]
    system = _disk_of(layout, "/")
    if system is None:
        return {}, [Check("disks", FAIL, "no filesystem is mounted at / under the source root")]
    plan = {system: 0}  # type: Dict[str, int]
    for entry in config.data_disks:
        disk = _disk_of(layout, entry.mount_point)
        name = f"data disk {entry.number}"
        if disk is None:
            checks.append(Check(name, FAIL, f"{entry.mount_point} is not a mounted filesystem"))
        elif disk == system:
            checks.append(
                Check(
                    name,
                    FAIL,
                    f"{entry.mount_point} is on the system disk {disk}, which migrates to disk 0 anyway; "
                    "remove it from DataDisks",
                )
            )
        elif plan.get(disk, entry.number) != entry.number:
            checks.append(
                Check(
                    name,
                    FAIL,
                    f"{entry.mount_point} is on {disk}, already mapped to data disk {plan[disk]}",
                )
            )
        elif entry.number in plan.values() and plan.get(disk) != entry.number:
            checks.append(
                Check(name, FAIL, f"data disk {entry.number} is mapped from two source disks")
            )
        else:
            plan[disk] = entry.number
    left_out = [m["mount"] for m in layout.get("mounts", []) if m.get("disk") not in plan]
    essential = sorted(m for m in left_out if m in ESSENTIAL_MOUNTS)
    if essential:  # the fixups would refuse at the end of the transfer: say so now
        checks.append(
            Check(
                "left out",
                FAIL,
                "{} on a disk that is neither the system disk nor in DataDisks: the system "
                "cannot boot without it; add its disk to DataDisks".format(", ".join(essential)),
            )
        )
        left_out = [m for m in left_out if m not in essential]
    if left_out:
        checks.append(
            Check(
                "left out",
                WARN,
                "{} not on the system disk nor in DataDisks: not migrated".format(
                    ", ".join(sorted(left_out))
                ),
            )
        )
    return plan, checks


def migrated_mounts(layout: Dict[str, Any], plan: Dict[str, int]) -> List[Dict[str, Any]]:
    """The mounts that migrate, parents before children (/ first)."""
    mounts = [m for m in layout.get("mounts", []) if m.get("disk") in plan]
    return sorted(mounts, key=lambda m: m["mount"].count("/") if m["mount"] != "/" else 0)


def _layout_key(layout: Dict[str, Any], disk: str) -> str:
    """The key of source disk `disk` (e.g. /dev/vda) in layout["disks"]."""
    for m in layout.get("mounts", []):
        if m.get("disk") == disk and "disk_index" in m:
            return str(m["disk_index"])
    return disk


def destination_layout(layout: Dict[str, Any], plan: Dict[str, int]) -> Dict[str, Any]:
    """The prepare body: the source layout with its disks keyed by destination index."""
    body = {
        k: v for k, v in layout.items() if k not in ("disks", "mounts", "unsupported", "ignored")
    }  # type: Dict[str, Any]
    body["disks"] = {
        str(index): layout["disks"][_layout_key(layout, disk)] for disk, index in plan.items()
    }
    return body


def needed_bytes(layout: Dict[str, Any], plan: Dict[str, int]) -> Dict[int, Tuple[str, int]]:
    """Per destination disk: its table type and the bytes the receiver needs for it
    (protocol.disk_need, the rule the receiver plans with)."""
    need = {}  # type: Dict[int, Tuple[str, int]]
    for disk, index in plan.items():
        source = layout.get("disks", {}).get(_layout_key(layout, disk), {})
        label = str(source.get("label") or layout.get("label"))
        need[index] = (label, disk_need(source, label))
    return need


def _layout_checks(layout: Dict[str, Any]) -> List[Check]:
    checks = []  # type: List[Check]
    reasons = layout.get("unsupported") or []
    for reason in reasons:
        checks.append(Check("layout", FAIL, f"unsupported: {reason}"))
    by_disk = {}  # type: Dict[str, List[str]]
    for m in layout.get("mounts", []):
        by_disk.setdefault(str(m.get("disk")), []).append(
            "{} {}".format(m.get("mount"), m.get("fs"))
        )
    found = "; ".join(
        "{}: {}".format(disk, ", ".join(sorted(items))) for disk, items in sorted(by_disk.items())
    )
    if not reasons:
        checks.append(
            Check(
                "disks",
                OK,
                "{} ({}): {}".format(
                    len(layout.get("disks") or {}), layout.get("label") or "?", found or "none"
                ),
            )
        )
    for item in layout.get("ignored") or []:
        checks.append(
            Check(
                "ignored",
                WARN,
                "{} ({}): {}; not migrated".format(
                    item.get("mount") or "-", item.get("fs"), item.get("reason")
                ),
            )
        )
    for m in layout.get("mounts", []):
        used, size = int(m.get("used") or 0), int(m.get("size") or 0)
        checks.append(
            Check(
                "used {}".format(m.get("mount")),
                OK,
                "{} of {} ({} on {})".format(
                    human(used), human(size), m.get("fs"), m.get("device")
                ),
            )
        )
    return checks


def _receiver_checks(
    config: Config, layout: Dict[str, Any], plan: Dict[str, int], client: Any
) -> List[Check]:
    started = time.time()
    try:
        hello = client.hello()
    except Exception as e:  # any failure to reach or trust the receiver is reported as a FAIL
        checks = [Check("receiver", FAIL, f"{describe_error(e)} ({config.address})")]
        checks.append(Check("capacity", WARN, "not checked: the receiver is unreachable"))
        checks.append(Check("clock", WARN, "not checked: the receiver is unreachable"))
        return checks
    finished = time.time()
    checks = [
        Check(
            "receiver",
            OK,
            "{} reachable, fingerprint matches, protocol {}".format(
                config.address, hello.get("protocol")
            ),
        )
    ]
    disks = hello.get("disks") or {}
    bound = str(hello.get("source") or "")
    mine = str(getattr(client, "source", "") or "")
    if bound and bound.split(" ")[0] != mine.split(" ")[0]:
        checks.append(
            Check(
                "destination",
                FAIL,
                f"DESTINATION_TAKEN: it is being migrated from another server ({bound}); point "
                "Destination at this server's own receiver",
            )
        )
    elif hello.get("prepared"):
        checks.append(Check("destination", OK, "prepared for this server: the stages resume"))
    else:  # say what prepare will do to them, while the operator can still stop
        paths = ", ".join(str(d.get("path")) for _, d in sorted(disks.items()))
        checks.append(
            Check(
                "destination",
                OK,
                f"not prepared yet: --stage prepare partitions and formats {paths or 'its disks'}"
                " (what they hold is lost)",
            )
        )
    for index, (label, need) in sorted(needed_bytes(layout, plan).items()):
        name = f"capacity disk {index}"
        have_disk = disks.get(str(index))
        if have_disk is None:
            checks.append(
                Check(
                    name,
                    FAIL,
                    f"DESTINATION_DISK_MISSING: the receiver has no disk {index} (start it with "
                    f"--data-disk {index}=DEV)",
                )
            )
            continue
        have = int(have_disk.get("size") or 0)
        usable = usable_bytes(have, label, int(have_disk.get("sector") or DEST_SECTOR))
        if need > usable:
            capped = usable < align_down(have)
            checks.append(
                Check(
                    name,
                    FAIL,
                    "DESTINATION_TOO_SMALL: need {} ({} bytes), have {} ({} bytes) on {}{}".format(
                        human(need),
                        need,
                        human(have),
                        have,
                        have_disk.get("path"),
                        f", of which an MBR table reaches {human(usable)}" if capped else "",
                    ),
                )
            )
        else:
            checks.append(
                Check(
                    name,
                    OK,
                    "need {}, have {} on {}".format(
                        human(need), human(have), have_disk.get("path")
                    ),
                )
            )
    remote = hello.get("time")
    if isinstance(remote, (int, float)):
        skew = float(remote) - (started + finished) / 2
        if abs(skew) > SKEW_WARN_SECONDS:
            checks.append(
                Check(
                    "clock",
                    WARN,
                    f"the receiver's clock is {skew:+.1f} s off; file times are copied as they are, "
                    "but logs will not line up (set up NTP)",
                )
            )
        else:
            checks.append(Check("clock", OK, f"skew {skew:+.1f} s"))
    return checks


def _state_space(config: Config) -> Check:
    try:
        st = os.statvfs(config.base_dir)
    except OSError as e:
        return Check("state space", FAIL, f"cannot stat {config.base_dir}: {e}")
    free = st.f_bavail * st.f_frsize
    if free < STATE_MIN_FREE:
        return Check(
            "state space",
            WARN,
            f"only {human(free)} free beside the agent in {config.base_dir} (logs and state need ~{human(STATE_MIN_FREE)})",
        )
    return Check("state space", OK, f"{human(free)} free in {config.base_dir}")


def _network_check(layout: Dict[str, Any]) -> Check:
    found = layout.get("addresses") or []
    if not found:
        return Check(
            "network",
            WARN,
            "no address found (`ip -o addr` failed): the destination's network fixup cannot "
            "check that none of this server's addresses stays configured",
        )
    return Check(
        "network",
        OK,
        "{}: the destination gets its own by DHCP; no configuration may keep these".format(
            ", ".join(found)
        ),
    )


def run_prechecks(
    config: Config, layout: Dict[str, Any], client: Any, source_root: str = "/"
) -> List[Check]:
    """Every precheck, in report order; changes nothing."""
    family, pretty = os_family(source_root)
    checks = [
        Check("os", OK, f"{pretty} ({family} family)")
        if family
        else Check("os", WARN, f"{pretty}: not a RHEL- or Debian-family system; untested")
    ]
    checks.extend(_layout_checks(layout))
    checks.append(_network_check(layout))
    plan, plan_checks = plan_disks(config, layout)
    checks.extend(plan_checks)
    checks.extend(_receiver_checks(config, layout, plan, client))
    checks.append(_state_space(config))
    return checks


def failures(checks: List[Check]) -> List[Check]:
    return [c for c in checks if c.status == FAIL]


def require_ok(checks: List[Check]) -> None:
    """Raise PRECHECK_FAILED naming the failed checks (prepare aborts before any change)."""
    failed = failures(checks)
    if failed:
        raise AgentError(
            "PRECHECK_FAILED",
            "; ".join(f"{c.name}: {c.message}" for c in failed),
            "fix what the FAIL lines say (run with --check to see them all), then run again",
        )
