"""Bring the migrated system up on the destination's network by DHCP.

The source's public IP does not move with it, and its NIC is not the destination's: a static
configuration or a MAC-pinned name would leave the migrated server unreachable. So, in
whichever system the source uses (all that are present are fixed):

- every Ethernet configuration with static addresses is switched to DHCP (IPv6: SLAAC/auto),
  and its addresses, netmask/prefix, gateway, static routes (an ifcfg's route-* files), DNS
  servers and MAC pinning are removed;
- the first NIC ("primary") is made to match the destination's first NIC. Its name is often
  different (eth0 on Xen becomes ens3 or enp0s3 under QEMU, depending on the PCI slot), so
  when the plan knows the destination's name it is used; otherwise the configuration matches
  any Ethernet name by pattern: ifupdown `auto /e*/1=eth0` (the first kernel interface whose
  name starts with "e", configured by the `iface eth0` stanza; checked with ifupdown 0.8's
  `ifup -n`), netplan `match: {name: "e*"}`, a keyfile without interface-name, a networkd
  .network file with `[Match] Name=e*`;
- MAC-pinned persistent-net udev rules (70-persistent-net.rules) are dropped. A
  75-persistent-net-generator.rules symlink to /dev/null is kept: it disables a generator that
  would pin the destination's MAC at the first boot.

ifcfg files keep their DEVICE= unless the plan names the destination's NIC (they cannot match
by pattern); without NetworkManager, a DEVICE=ethN the destination will not have fails the step.
An ifupdown bridge, bond or VLAN on the first NIC is moved to the plan's NIC, or fails the step.
When the plan lists the source's static addresses, the step fails if any of them is still
configured in those files (say, in an `up ip addr add` line it cannot interpret).
A static ifupdown stanza's own `up` commands that name an address on its network (a route's
next hop, an alias) go with it, as that network is the source's.

The step also fails when the first NIC ends up configured by DHCP but the migrated system has
nothing to run it with (DHCP_CLIENTS: a DHCP client for ifupdown, systemd-networkd or
NetworkManager for netplan, NetworkManager for keyfiles, NetworkManager or dhclient for ifcfg):
that system would boot without network. ifupdown only Recommends a client, so a minimal
Debian without one is the common case; the failure names the package to install.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_interface
from pathlib import PurePosixPath

from rehost.online.fixup.bootloader import KERNEL_CMDLINE, grub_defaults
from rehost.online.fixup.common import Context

IPNetwork = IPv4Network | IPv6Network
NIC_PATTERN = "e*"
IFUPDOWN_STANZAS = {"iface", "mapping", "auto", "rename", "source", "source-directory"}
IFUPDOWN_STATIC = {
    "address",
    "netmask",
    "gateway",
    "broadcast",
    "network",
    "pointopoint",
    "hwaddress",
    "dns-nameservers",
    "scope",
}
IFUPDOWN_COMMANDS = {"up", "down", "pre-up", "pre-down", "post-up", "post-down"}
IFUPDOWN_VIRTUAL = {"bridge_ports", "bridge-ports", "bond-slaves", "bond_slaves", "vlan-raw-device"}
KEYFILE_STATIC = re.compile(r"^(address\d*|addresses|gateway|dns|routes?\d*(_options)?)$")
IFCFG_STATIC = re.compile(
    r"^(IPADDR\d*|NETMASK\d*|PREFIX\d*|GATEWAY\d*|HWADDR|DNS\d+|NETWORK|BROADCAST"
    r"|IPV6ADDR|IPV6ADDR_SECONDARIES|IPV6_DEFAULTGW)$"
)
# Switches that keep DHCP's DNS servers and routes out. Left after the static DNS servers and
# gateway are gone, they leave a DHCP address with no name resolution or no route; so they go
# from every converted configuration. The ones that keep the default route off go from the
# first NIC only: on another NIC they are a deliberate choice that DHCP does not change.
KEYFILE_NO_AUTO = {"ignore-auto-dns", "ignore-auto-routes"}
KEYFILE_NO_DEFAULT = {"never-default"}
IFCFG_NO_AUTO = {"PEERDNS", "PEERROUTES", "IPV6_PEERDNS", "IPV6_PEERROUTES"}
IFCFG_NO_DEFAULT = {"DEFROUTE", "IPV6_DEFROUTE"}
PERSISTENT_NET = re.compile(r'SUBSYSTEM=="net".*ATTR\{address\}==.*\bNAME:?=')
NETPLAN_NM = re.compile(r"(?m)^\s*renderer\s*:\s*[\"']?NetworkManager\b")
PATH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class _Client:
    """What brings a network system's DHCP configuration up, and the package that provides it."""

    names: tuple[str, ...]
    paths: tuple[str, ...]
    package: str


def _on_path(*names: str) -> tuple[str, ...]:
    return tuple(f"{d}/{n}" for n in names for d in PATH_DIRS)


# ifupdown 0.8 runs the first of dhclient, udhcpc, dhcpcd (pump in older versions) it finds on
# PATH and otherwise fails ("No DHCP client software found!"); it only Recommends
# isc-dhcp-client. netplan's
# default renderer is systemd-networkd (built-in DHCP client); NetworkManager has one built in
# too (keyfiles, and ifcfg through its ifcfg-rh plugin); the legacy network-scripts run
# /sbin/dhclient.
_NM = ("/usr/sbin/NetworkManager", "/sbin/NetworkManager")
_NETWORKD = ("/usr/lib/systemd/systemd-networkd", "/lib/systemd/systemd-networkd")
DHCP_CLIENTS = {
    "ifupdown": _Client(
        ("dhclient", "dhcpcd", "udhcpc", "pump"),
        _on_path("dhclient", "dhcpcd", "udhcpc", "pump"),
        "isc-dhcp-client (or dhcpcd-base, or udhcpc)",
    ),
    "netplan": _Client(
        ("systemd-networkd",),
        _NETWORKD,
        "systemd-networkd (in the systemd package on older releases)",
    ),
    "networkd": _Client(("systemd-networkd",), _NETWORKD, "systemd-networkd"),
    "keyfiles": _Client(("NetworkManager",), _NM, "NetworkManager (network-manager on Debian)"),
    "ifcfg": _Client(
        ("NetworkManager", "dhclient"),
        (*_NM, "/sbin/dhclient", "/usr/sbin/dhclient"),
        "NetworkManager (or dhclient for the legacy network-scripts)",
    ),
}


def _is_comment(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _join(lines: list[str], original: str) -> str:
    return "\n".join(lines) + ("\n" if original.endswith("\n") or not original else "")


# -- ifupdown -----------------------------------------------------------------------------


@dataclass
class _Iface:
    path: str
    index: int
    name: str
    family: str
    method: str
    options: list[int] = field(default_factory=list)


def _mentions(ctx: Context, line: str) -> bool:
    return any(_address_re(a).search(line) for a in ctx.plan.static_addresses)


_IP_LITERAL = re.compile(
    r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]*:[0-9A-Fa-f:.]*)(?![\w.:])"
)


def _stanza_networks(options: list[str]) -> list[IPNetwork]:
    """The networks a static stanza's `address` (with its prefix or `netmask`) was on."""
    values: dict[str, list[str]] = {}
    for line in options:
        words = line.split()
        if len(words) >= 2:
            values.setdefault(words[0], []).append(words[1])
    mask = values.get("netmask", [""])[0]
    networks = []
    for address in values.get("address", []):
        text = address if "/" in address or not mask else f"{address}/{mask}"
        try:
            networks.append(ip_interface(text).network)
        except ValueError:
            continue
    return networks


def _on_networks(line: str, networks: list[IPNetwork]) -> bool:
    """True if `line` names an address on one of `networks` (a route's next hop, an alias)."""
    for literal in _IP_LITERAL.findall(line):
        try:
            ip = ip_address(literal)
        except ValueError:
            continue
        if any(ip.version == n.version and ip in n for n in networks):
            return True
    return False


def _ifupdown(ctx: Context) -> tuple[list[str], str]:
    paths = ["/etc/network/interfaces", *ctx.listdir("/etc/network/interfaces.d")]
    texts = {p: t for p in paths if (t := ctx.read(p)) is not None}
    files = {p: t.splitlines() for p, t in texts.items()}
    stanzas: list[_Iface] = []
    for path, lines in files.items():
        current = None
        for i, line in enumerate(lines):
            words = line.split()
            if _is_comment(line):
                continue
            if words[0] in IFUPDOWN_STANZAS or words[0].startswith("allow-"):
                current = None
                if words[0] == "iface" and len(words) >= 4:
                    current = _Iface(path, i, words[1], words[2], words[3])
                    stanzas.append(current)
            elif current is not None:
                current.options.append(i)

    def physical(s: _Iface) -> bool:
        opts = {files[s.path][i].split()[0] for i in s.options}
        return (
            s.family == "inet"
            and s.name != "lo"
            and not re.search(r"[.:]", s.name)
            and not (opts & IFUPDOWN_VIRTUAL)
        )

    primary = next((s.name for s in stanzas if physical(s)), None)
    nic = ctx.plan.nic
    rename = {primary: nic} if primary and nic else {}
    edits: dict[tuple[str, int], list[str]] = {}
    _ifupdown_ports(ctx, files, edits, stanzas, primary)
    for s in stanzas:
        if s.name == "lo":
            continue
        method = s.method
        if method == "static":
            method = "dhcp" if s.family == "inet" else "auto"
            networks = _stanza_networks([files[s.path][i] for i in s.options])
            for i in s.options:
                line = files[s.path][i]
                first = line.split()[0]
                if first in IFUPDOWN_STATIC or (
                    first in IFUPDOWN_COMMANDS
                    and (_mentions(ctx, line) or _on_networks(line, networks))
                ):
                    edits[(s.path, i)] = []
        name = rename.get(s.name, s.name)
        if (name, method) != (s.name, s.method):
            line = files[s.path][s.index]
            indent = line[: len(line) - len(line.lstrip())]
            rest = line.split()[4:]
            edits[(s.path, s.index)] = [" ".join([f"{indent}iface", name, s.family, method, *rest])]
    dhcp = ""
    if primary:
        _ifupdown_auto(files, edits, stanzas, primary, nic)
        head = next(st for st in stanzas if st.name == primary and st.family == "inet")
        if head.method in ("static", "dhcp"):
            dhcp = f"{head.path} (iface {rename.get(primary, primary)} inet dhcp)"
    for path, lines in files.items():
        out = []
        for i, line in enumerate(lines):
            out += edits.get((path, i), [line])
        ctx.write(path, _join(out, texts[path]))
    return list(files), dhcp


def _ifupdown_ports(
    ctx: Context,
    files: dict[str, list[str]],
    edits: dict[tuple[str, int], list[str]],
    stanzas: list[_Iface],
    primary: str | None,
) -> None:
    """Move a bridge, bond or VLAN on the source's NIC to the destination's, or refuse.

    The source's NIC does not exist on the destination, so a bridge left on it has no port
    and the server no network. With the destination's name known the port is renamed; by
    pattern it cannot be (bridge-ports and bond-slaves take names), so the step fails rather
    than report a server without network as ready.
    """
    nic = ctx.plan.nic
    for s in stanzas:
        for i in s.options:
            words = files[s.path][i].split()
            if words[0] not in IFUPDOWN_VIRTUAL:
                continue
            # Without a physical stanza, any Ethernet-like port is the source's NIC.
            old = [
                w for w in words[1:] if w == primary or (primary is None and re.match(r"e\w*\d", w))
            ]
            if not old:
                continue
            if nic and len(old) == 1:
                line = files[s.path][i]
                indent = line[: len(line) - len(line.lstrip())]
                edits[(s.path, i)] = [indent + " ".join(nic if w == old[0] else w for w in words)]
                continue
            raise ctx.fail(
                f"{s.path}:{i + 1}: iface {s.name} is built on the source's NIC "
                f"{', '.join(old)} ({words[0]}), which has another name on the destination; "
                "bridges, bonds and VLANs are not converted, so it would come up without a port",
                hint=f"on the source, configure the first NIC directly instead of through "
                f"{s.name} before the final pass (and re-create {s.name} on the destination "
                "once it boots), then run the finalize again",
            )


def _ifupdown_auto(
    files: dict[str, list[str]],
    edits: dict[tuple[str, int], list[str]],
    stanzas: list[_Iface],
    primary: str,
    nic: str,
) -> None:
    """Bring the primary up at boot: under the destination's name, or by name pattern."""
    pattern = f"/{NIC_PATTERN}/1={primary}"
    mentioned = None
    for path, lines in files.items():
        for i, line in enumerate(lines):
            words = line.split()
            if _is_comment(line) or not (words[0] == "auto" or words[0].startswith("allow-")):
                continue
            if pattern in words[1:] and not nic:
                return
            if primary not in words[1:]:
                continue
            indent = line[: len(line) - len(line.lstrip())]
            if nic:
                words = [nic if w == primary else w for w in words]
                edits[(path, i)] = [indent + " ".join(words)]
                continue
            rest = [w for w in words[1:] if w != primary]
            edits[(path, i)] = [indent + " ".join([words[0], *rest])] if rest else []
            if mentioned is None:
                mentioned = (path, i)
                edits[(path, i)].insert(0, f"{indent}auto {pattern}")
    if nic or mentioned is not None:
        return
    first = next(s for s in stanzas if s.name == primary)
    edits.setdefault((first.path, first.index), [files[first.path][first.index]])
    edits[(first.path, first.index)].insert(0, f"auto {pattern}")


# -- netplan -------------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _netplan(ctx: Context) -> tuple[list[str], str]:
    paths = [*ctx.listdir("/etc/netplan", ".yaml"), *ctx.listdir("/etc/netplan", ".yml")]
    primary = None
    dhcp = ""
    for path in sorted(paths):
        text = ctx.read(path) or ""
        lines = text.splitlines()
        start = next(
            (i for i, ln in enumerate(lines) if re.match(r"^\s*ethernets:\s*(#.*)?$", ln)), None
        )
        if start is None:
            if re.search(r"(?m)^\s*ethernets\s*:", text):
                raise ctx.fail(f"{path}: cannot read its ethernets section (flow style)")
            continue
        top = _indent(lines[start])
        out = lines[: start + 1]
        i = start + 1
        child = None
        while i < len(lines):
            line = lines[i]
            if _is_comment(line):
                out.append(line)
                i += 1
                continue
            if _indent(line) <= top:
                break
            child = child or _indent(line)
            m = re.match(r"^\s*(\"[^\"]+\"|'[^']+'|[^\s:#]+)\s*:", line)
            if _indent(line) != child or m is None:
                raise ctx.fail(f"{path}:{i + 1}: cannot read the ethernets section")
            name = m.group(1)
            i += 1
            while i < len(lines) and (_is_comment(lines[i]) or _indent(lines[i]) > child):
                i += 1
            if primary is None:
                primary, dhcp = name, f"{path} (ethernets: {name}: dhcp4: true)"
            step = max(child - top, 2)
            pad, pad2, pad3 = " " * child, " " * (child + step), " " * (child + 2 * step)
            if name == primary:
                match = ctx.plan.nic or NIC_PATTERN
                out += [
                    f"{pad}{name}:",
                    f"{pad2}match:",
                    f'{pad3}name: "{match}"',
                    f"{pad2}dhcp4: true",
                ]
            else:
                out += [f"{pad}{name}:", f"{pad2}dhcp4: true", f"{pad2}optional: true"]
        out += lines[i:]
        ctx.write(path, _join(out, text))
    return paths, dhcp


# -- NetworkManager keyfiles ---------------------------------------------------------------


def _keyfiles(ctx: Context) -> tuple[list[str], str]:
    paths = ctx.listdir("/etc/NetworkManager/system-connections")
    primary_seen = False
    dhcp = ""
    for path in paths:
        text = ctx.read(path) or ""
        if not re.search(r"(?m)^\s*type\s*=\s*(ethernet|802-3-ethernet)\s*$", text):
            continue
        primary, primary_seen = not primary_seen, True
        section = ""
        if primary:
            dhcp = f"{path} ([ipv4] method=auto)"
        out = []
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("["):
                section = stripped.strip("[]")
                out.append(line)
                continue
            key, sep, value = stripped.partition("=")
            key = key.strip()
            if sep and section == "connection" and key == "interface-name" and primary:
                if ctx.plan.nic:
                    out.append(f"interface-name={ctx.plan.nic}")
                continue
            if sep and section in ("ethernet", "802-3-ethernet") and key == "mac-address":
                continue
            if sep and section in ("ipv4", "ipv6"):
                if key == "method" and value.strip() == "manual":
                    out.append("method=auto")
                    continue
                if KEYFILE_STATIC.match(key) or key in KEYFILE_NO_AUTO:
                    continue
                if primary and key in KEYFILE_NO_DEFAULT:
                    continue
            out.append(line)
        ctx.write(path, _join(out, text))
    return paths, dhcp


# -- ifcfg ---------------------------------------------------------------------------------


def _ifcfg_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            values[key] = value.strip("\"'")
    return values


def _ifcfg_ethernet(values: dict[str, str]) -> bool:
    return values.get("TYPE", "Ethernet") == "Ethernet" and values.get("DEVICE") != "lo"


def _ifcfg(ctx: Context) -> tuple[list[str], str]:
    scripts = "/etc/sysconfig/network-scripts"
    paths = [
        p
        for p in ctx.listdir(scripts)
        if PurePosixPath(p).name.startswith("ifcfg-") and PurePosixPath(p).name != "ifcfg-lo"
    ]
    primary_seen = False
    dhcp = ""
    for path in paths:
        text = ctx.read(path) or ""
        values = _ifcfg_values(text)
        if not _ifcfg_ethernet(values):
            continue
        primary, primary_seen = not primary_seen, True
        if primary:
            dhcp = f"{path} (BOOTPROTO=dhcp)"
        out = []
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and (IFCFG_STATIC.match(key) or key in IFCFG_NO_AUTO):
                continue
            if sep and primary and key in IFCFG_NO_DEFAULT:
                continue
            if sep and key == "BOOTPROTO" and value.strip("\"'") != "dhcp":
                line = "BOOTPROTO=dhcp"
            elif sep and key == "ONBOOT" and primary and value.strip("\"'") != "yes":
                line = "ONBOOT=yes"
            elif sep and key == "DEVICE" and primary and ctx.plan.nic:
                line = f"DEVICE={ctx.plan.nic}"
            out.append(line)
        if "BOOTPROTO" not in values:
            out.append("BOOTPROTO=dhcp")
        ctx.write(path, _join(out, text))
        # its static routes go with its gateway: their next hops were on the source's network
        suffix = PurePosixPath(path).name[len("ifcfg-") :]
        for routes in ("route-", "route6-"):
            ctx.remove(f"{scripts}/{routes}{suffix}")
    return paths, dhcp


# -- systemd-networkd ----------------------------------------------------------------------

NETWORKD_DIR = "/etc/systemd/network"
NETWORKD_STATIC = {"Address", "Gateway", "DNS", "IPv6AcceptRA"}
NETWORKD_STATIC_SECTIONS = {"Address", "Route"}
NETWORKD_DHCP_SECTIONS = {"DHCP", "DHCPv4", "DHCPv6", "IPv6AcceptRA"}
NETWORKD_NO_AUTO = {"UseDNS", "UseRoutes", "UseGateway"}
NETWORKD_PORT = {"Bridge", "Bond"}


def _sections(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}} of a systemd unit-style file (comments skipped)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            section = stripped.strip("[]")
            out.setdefault(section, {})
            continue
        key, sep, value = stripped.partition("=")
        if sep:
            out.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return out


def _networkd_ethernet(parsed: dict[str, dict[str, list[str]]]) -> bool:
    """Whether a .network file configures a physical Ethernet NIC (not lo, a bridge, a port)."""
    match, network = parsed.get("Match", {}), parsed.get("Network", {})
    names = [n.lstrip("!") for v in match.get("Name", []) for n in v.split()]
    if any(not n.startswith("e") for n in names):
        return False
    if any(t != "ether" for t in match.get("Type", [])):
        return False
    return not (set(network) & NETWORKD_PORT)


def _networkd(ctx: Context) -> tuple[list[str], str]:
    # networkd reads these only when it is installed; without it they are inert.
    if not any(_executable(ctx, p) for p in DHCP_CLIENTS["networkd"].paths):
        return [], ""
    paths = ctx.listdir(NETWORKD_DIR, ".network")
    dhcp = ""
    for path in paths:
        text = ctx.read(path) or ""
        parsed = _sections(text)
        if not _networkd_ethernet(parsed):
            continue
        primary = not dhcp
        if primary:
            dhcp = f"{path} ([Network] DHCP=yes)"
        out: list[str] = []
        section = ""
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("["):
                section = stripped.strip("[]")
                if section in NETWORKD_STATIC_SECTIONS:
                    continue
                out.append(line)
                if section == "Match" and primary:
                    # The old NIC's MAC, name or PCI path: match the destination's instead.
                    out.append(f"Name={ctx.plan.nic or NIC_PATTERN}")
                if section == "Network":
                    out.append("DHCP=yes")
                continue
            if section in NETWORKD_STATIC_SECTIONS:
                continue
            key, sep, _ = stripped.partition("=")
            key = key.strip()
            if sep and not stripped.startswith(("#", ";")):
                if section == "Match" and primary:
                    continue
                if section == "Network" and (key in NETWORKD_STATIC or key == "DHCP"):
                    continue
                if section in NETWORKD_DHCP_SECTIONS and key in NETWORKD_NO_AUTO:
                    continue
            out.append(line)
        if primary and "Match" not in parsed:
            out[:0] = ["[Match]", f"Name={ctx.plan.nic or NIC_PATTERN}", ""]
        if "Network" not in parsed:
            out += ["", "[Network]", "DHCP=yes"]
        ctx.write(path, _join(out, text))
    return paths, dhcp


# -- udev and the check --------------------------------------------------------------------


def _udev(ctx: Context) -> None:
    for path in ctx.listdir("/etc/udev/rules.d", ".rules"):
        text = ctx.read(path) or ""
        kept = [ln for ln in text.splitlines() if not PERSISTENT_NET.search(ln)]
        if len(kept) == len(text.splitlines()):
            continue
        if all(_is_comment(ln) for ln in kept):
            ctx.remove(path)
        else:
            ctx.write(path, _join(kept, text))


def _address_re(address: str) -> re.Pattern[str]:
    ip = address.split("/")[0]
    return re.compile(rf"(?<![0-9A-Za-z.:]){re.escape(ip)}(?![0-9A-Za-z.:])")


def _check_addresses(ctx: Context, paths: list[str]) -> None:
    for address in ctx.plan.static_addresses:
        pattern = _address_re(address)
        for path in paths:
            for n, line in enumerate((ctx.read(path) or "").splitlines(), 1):
                if pattern.search(line) and not _is_comment(line):
                    raise ctx.fail(
                        f"{path}:{n} still configures the source's address {address}: "
                        f"{line.strip()}",
                        hint="remove that line on the source (or convert it to DHCP) and run "
                        "the finalize again",
                    )


def _executable(ctx: Context, path: str) -> bool:
    host = ctx.path(path)
    return host.is_file() and bool(host.stat().st_mode & 0o111)


def _check_dhcp_client(ctx: Context, system: str, where: str) -> None:
    """Fail unless the migrated system has what brings `system`'s DHCP configuration up."""
    need = DHCP_CLIENTS[system]
    renderer = system
    if system == "netplan" and any(
        NETPLAN_NM.search(ctx.read(p) or "")
        for p in [*ctx.listdir("/etc/netplan", ".yaml"), *ctx.listdir("/etc/netplan", ".yml")]
    ):
        need, renderer = DHCP_CLIENTS["keyfiles"], "netplan with renderer NetworkManager"
    if any(_executable(ctx, path) for path in need.paths):
        return
    ctx.log(f"network: no DHCP client for {renderer}: none of {', '.join(need.paths)} exists")
    raise ctx.fail(
        f"the first NIC is set to DHCP in {where}, but the migrated system has no DHCP "
        f"client for {renderer}: none of {', '.join(need.names)} is installed, so it would "
        f"come up without network; install {need.package}",
        hint=f"install {need.package} in the migrated system (on the source before the "
        "final pass, or in a chroot of the destination) and run the finalize again",
    )


# Where a system turns off predictable interface names, so that its first NIC stays "eth0".
NAMING_OFF = (
    "/etc/udev/rules.d/80-net-setup-link.rules",
    "/etc/udev/rules.d/80-net-name-slot.rules",
    "/etc/systemd/network/99-default.link",
)


def _keeps_kernel_names(ctx: Context) -> bool:
    """Whether the migrated system names its NICs eth0, eth1... (net.ifnames=0 or a mask)."""
    if any(
        ctx.path(p, follow_last=False).is_symlink() or ctx.read(p) is not None for p in NAMING_OFF
    ):
        return True
    for path in [*grub_defaults(ctx), KERNEL_CMDLINE]:
        for line in (ctx.read(path) or "").splitlines():
            if not _is_comment(line) and re.search(r"(?<![\w.])net\.ifnames=0\b", line):
                return True
    return False


def _check_ifcfg_name(ctx: Context, paths: list[str]) -> None:
    """Refuse an ifcfg-only system whose first NIC is bound to a name the destination lacks.

    ifcfg cannot match by pattern. The legacy network-scripts (no NetworkManager) bring up
    exactly DEVICE=, so a source named eth0 (Xen's netfront, say, which predictable naming
    leaves as eth0) finds no eth0 on the destination (virtio: ens3, enp0s3...) and boots
    without network. The receiver's rescue system could report its own name for the NIC, but
    that is a guess (rescue systems often boot with net.ifnames=0, or another udev's naming
    scheme), and a wrong name would also break the systems that match by pattern.
    NetworkManager is left alone: its keyfiles match by pattern and it can configure the
    NIC itself.
    """
    parsed = ((p, _ifcfg_values(ctx.read(p) or "")) for p in paths)
    primary, values = next(((p, v) for p, v in parsed if _ifcfg_ethernet(v)), (None, {}))
    if primary is None or ctx.plan.nic or any(_executable(ctx, p) for p in _NM):
        return
    device = values.get("DEVICE") or PurePosixPath(primary).name.removeprefix("ifcfg-")
    if not re.fullmatch(r"eth\d+", device) or _keeps_kernel_names(ctx):
        return
    raise ctx.fail(
        f"{primary} binds the first NIC to {device} (DEVICE=), but the migrated system uses "
        f"predictable interface names, so on the destination it will be ens3, enp0s3 or the "
        f"like; the network-scripts cannot match by pattern and it would come up without "
        "network",
        hint="on the source, add net.ifnames=0 to GRUB_CMDLINE_LINUX in /etc/default/grub "
        "(the destination's first NIC is then eth0 too) or install NetworkManager, before the "
        "final pass, and run the finalize again",
    )


def fix_network(ctx: Context) -> None:
    found = {
        "ifupdown": _ifupdown(ctx),
        "netplan": _netplan(ctx),
        "keyfiles": _keyfiles(ctx),
        "ifcfg": _ifcfg(ctx),
        "networkd": _networkd(ctx),
    }
    _udev(ctx)
    _check_addresses(ctx, [p for paths, _ in found.values() for p in paths])
    for system, (_, dhcp) in found.items():
        if dhcp:
            _check_dhcp_client(ctx, system, dhcp)
    _check_ifcfg_name(ctx, found["ifcfg"][0])
