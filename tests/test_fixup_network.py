"""The network step on small synthetic trees: DNS/route switches, networkd, NIC names, bridges.

Each test builds only the files the case needs and runs `fix_network` alone, so the oracle is
the exact resulting file (or the failure's message).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import test_fixup as T
from rehost.online.fixup import FixupFailed, FixupPlan
from rehost.online.fixup.common import Context, FixupReport
from rehost.online.fixup.network import fix_network
from rehost.online.receiver.fixup_hook import plan_from_prepare

KEYFILE_PATH = "/etc/NetworkManager/system-connections/a.nmconnection"
IFCFG_PATH = "/etc/sysconfig/network-scripts/ifcfg-eth0"
NETWORKD = "/usr/lib/systemd/systemd-networkd"
NM = "/usr/sbin/NetworkManager"


def run(root: Path, plan: FixupPlan | None = None) -> FixupReport:
    report = FixupReport()
    ctx = Context(root, plan or T.plan(), T.Recorder(), lambda line: None, report, "network")
    fix_network(ctx)
    return report


# -- finding 6: DHCP must be allowed to bring DNS servers and routes ------------------------


def test_keyfile_dhcp_takes_dns_and_routes_from_dhcp(tmp_path: Path) -> None:
    T.put(
        tmp_path,
        KEYFILE_PATH,
        "[connection]\nid=a\ntype=ethernet\n[ipv4]\naddress1=203.0.113.10/24\ndns=1.1.1.1;\n"
        "ignore-auto-dns=true\nignore-auto-routes=true\nnever-default=true\nmethod=manual\n"
        "[ipv6]\nignore-auto-dns=true\nmethod=auto\n",
    ).chmod(0o600)
    T.executable(tmp_path, NM)
    run(tmp_path)
    assert T.read(tmp_path, KEYFILE_PATH) == (
        "[connection]\nid=a\ntype=ethernet\n[ipv4]\nmethod=auto\n[ipv6]\nmethod=auto\n"
    )


def test_keyfile_second_nic_keeps_never_default(tmp_path: Path) -> None:
    """A second NIC kept off the default route stays so; its DNS switch still goes."""
    T.executable(tmp_path, NM)
    first = "[connection]\nid=a\ntype=ethernet\n[ipv4]\nmethod=auto\n"
    T.put(tmp_path, KEYFILE_PATH, first).chmod(0o600)
    second = "/etc/NetworkManager/system-connections/b.nmconnection"
    T.put(
        tmp_path,
        second,
        "[connection]\nid=b\ntype=ethernet\n[ipv4]\naddress1=10.0.0.5/24\n"
        "ignore-auto-dns=true\nnever-default=true\nmethod=manual\n",
    ).chmod(0o600)
    run(tmp_path)
    assert T.read(tmp_path, second) == (
        "[connection]\nid=b\ntype=ethernet\n[ipv4]\nnever-default=true\nmethod=auto\n"
    )


def test_ifcfg_dhcp_takes_dns_and_routes_from_dhcp(tmp_path: Path) -> None:
    T.put(
        tmp_path,
        IFCFG_PATH,
        "DEVICE=eth0\nBOOTPROTO=none\nIPADDR=203.0.113.10\nDNS1=1.1.1.1\nPEERDNS=no\n"
        "PEERROUTES=no\nDEFROUTE=no\nIPV6_PEERDNS=no\nIPV6_DEFROUTE=no\n",
    )
    secondary = "/etc/sysconfig/network-scripts/ifcfg-eth1"
    T.put(tmp_path, secondary, "DEVICE=eth1\nBOOTPROTO=static\nPEERDNS=no\nDEFROUTE=no\n")
    T.executable(tmp_path, NM)
    run(tmp_path)
    assert T.read(tmp_path, IFCFG_PATH) == "DEVICE=eth0\nBOOTPROTO=dhcp\n"
    assert T.read(tmp_path, secondary) == "DEVICE=eth1\nBOOTPROTO=dhcp\nDEFROUTE=no\n"


def test_ifcfg_static_routes_go_with_the_gateway(tmp_path: Path) -> None:
    """route-eth0 names next hops on the source's network: left, NetworkManager or
    ifup-routes would try them on the destination's. Another interface's files stay."""
    scripts = "/etc/sysconfig/network-scripts"
    T.put(tmp_path, IFCFG_PATH, "DEVICE=eth0\nBOOTPROTO=none\nIPADDR=203.0.113.10\n")
    T.put(tmp_path, f"{scripts}/route-eth0", "10.0.0.0/8 via 203.0.113.254 dev eth0\n")
    T.put(tmp_path, f"{scripts}/route6-eth0", "2001:db8:1::/48 via 2001:db8::1 dev eth0\n")
    T.put(tmp_path, f"{scripts}/route-ib0", "10.9.0.0/16 via 10.8.0.1 dev ib0\n")
    T.put(tmp_path, f"{scripts}/ifcfg-ib0", "DEVICE=ib0\nTYPE=InfiniBand\nBOOTPROTO=none\n")
    T.executable(tmp_path, NM)
    report = run(tmp_path)
    left = sorted(os.listdir(tmp_path / scripts.lstrip("/")))
    assert left == ["ifcfg-eth0", "ifcfg-ib0", "route-ib0"]
    assert {c.path for c in report.changes} >= {f"{scripts}/route-eth0", f"{scripts}/route6-eth0"}


# -- finding 5: systemd-networkd -------------------------------------------------------------

NETWORK_FILE = "/etc/systemd/network/10-eth0.network"
NETWORK_STATIC = """\
# the source's uplink
[Match]
MACAddress=52:54:00:12:34:56
Path=pci-0000:00:03.0

[Network]
Address=203.0.113.10/24
Address=2001:db8::10/64
Gateway=203.0.113.1
DNS=203.0.113.53
IPv6AcceptRA=no
Domains=example.com

[Address]
Address=203.0.113.11/24

[Route]
Destination=198.51.100.0/24
Gateway=203.0.113.1

[DHCPv4]
UseDNS=no
UseRoutes=false
ClientIdentifier=mac
"""


def test_networkd_primary_matches_any_nic_by_dhcp(tmp_path: Path) -> None:
    T.executable(tmp_path, NETWORKD)
    T.put(tmp_path, NETWORK_FILE, NETWORK_STATIC)
    T.put(tmp_path, "/etc/systemd/network/05-lo.network", "[Match]\nName=lo\n")
    T.put(tmp_path, "/etc/systemd/network/20-br0.network", "[Match]\nName=br0\n[Network]\n")
    second = "/etc/systemd/network/30-eth1.network"
    T.put(tmp_path, second, "[Match]\nName=eth1\n\n[Network]\nAddress=10.0.0.5/24\n")
    run(tmp_path)
    assert T.read(tmp_path, NETWORK_FILE) == (
        "# the source's uplink\n[Match]\nName=e*\n\n[Network]\nDHCP=yes\nDomains=example.com\n\n"
        "[DHCPv4]\nClientIdentifier=mac\n"
    )
    assert T.read(tmp_path, second) == "[Match]\nName=eth1\n\n[Network]\nDHCP=yes\n"
    assert T.read(tmp_path, "/etc/systemd/network/05-lo.network") == "[Match]\nName=lo\n"
    assert (
        T.read(tmp_path, "/etc/systemd/network/20-br0.network") == "[Match]\nName=br0\n[Network]\n"
    )
    before = T.snapshot(tmp_path)
    assert run(tmp_path).changes == []  # idempotent
    assert T.snapshot(tmp_path) == before


def test_networkd_known_nic_and_missing_sections(tmp_path: Path) -> None:
    T.executable(tmp_path, NETWORKD)
    T.put(tmp_path, NETWORK_FILE, "[Address]\nAddress=203.0.113.10/24\n")
    run(tmp_path, T.plan(nic="ens3"))
    assert T.read(tmp_path, NETWORK_FILE) == "[Match]\nName=ens3\n\n\n[Network]\nDHCP=yes\n"


def test_networkd_known_nic_replaces_match(tmp_path: Path) -> None:
    T.executable(tmp_path, NETWORKD)
    T.put(tmp_path, NETWORK_FILE, "[Match]\nMACAddress=52:54:00:12:34:56\n[Network]\nDHCP=no\n")
    run(tmp_path, T.plan(nic="ens3"))
    assert T.read(tmp_path, NETWORK_FILE) == "[Match]\nName=ens3\n[Network]\nDHCP=yes\n"


def test_networkd_bridge_port_is_not_the_primary(tmp_path: Path) -> None:
    T.executable(tmp_path, NETWORKD)
    port = "[Match]\nName=eth0\n[Network]\nBridge=br0\n"
    T.put(tmp_path, "/etc/systemd/network/10-port.network", port)
    T.put(tmp_path, "/etc/systemd/network/20-eth1.network", "[Match]\nName=eth1\n")
    run(tmp_path)
    assert T.read(tmp_path, "/etc/systemd/network/10-port.network") == port
    assert T.read(tmp_path, "/etc/systemd/network/20-eth1.network") == (
        "[Match]\nName=e*\n\n[Network]\nDHCP=yes\n"
    )


def test_networkd_files_inert_without_networkd(tmp_path: Path) -> None:
    T.put(tmp_path, NETWORK_FILE, NETWORK_STATIC)
    run(tmp_path)
    assert T.read(tmp_path, NETWORK_FILE) == NETWORK_STATIC


def test_networkd_stale_address_fails(tmp_path: Path) -> None:
    """An address networkd's conversion does not interpret is caught by the address check."""
    T.executable(tmp_path, NETWORKD)
    T.put(
        tmp_path,
        NETWORK_FILE,
        "[Match]\nName=eth0\n[Network]\nDHCP=no\n[RoutingPolicyRule]\nFrom=203.0.113.10\n",
    )
    with pytest.raises(FixupFailed, match=r"10-eth0.network:6 still configures .*203\.0\.113\.10"):
        run(tmp_path)


# -- finding 4: an ifcfg DEVICE=ethN without a pattern to fall back on ----------------------


def _legacy_ifcfg(root: Path, grub: str = 'GRUB_CMDLINE_LINUX="rhgb quiet"\n') -> None:
    T.put(root, IFCFG_PATH, "DEVICE=eth0\nBOOTPROTO=none\nIPADDR=203.0.113.10\nONBOOT=yes\n")
    T.executable(root, "/sbin/dhclient")
    T.put(root, "/etc/default/grub", grub)


def test_ifcfg_eth0_with_predictable_names_fails(tmp_path: Path) -> None:
    _legacy_ifcfg(tmp_path)
    with pytest.raises(FixupFailed) as info:
        run(tmp_path)
    assert info.value.step == "network"
    assert "ifcfg-eth0 binds the first NIC to eth0" in info.value.reason
    assert info.value.hint is not None and "net.ifnames=0" in info.value.hint


@pytest.mark.parametrize(
    "case", ["net.ifnames=0", "udev mask", "plan.nic", "NetworkManager", "DEVICE=ens3"]
)
def test_ifcfg_name_that_will_exist_passes(tmp_path: Path, case: str) -> None:
    grub = 'GRUB_CMDLINE_LINUX="rhgb net.ifnames=0 quiet"\n' if case == "net.ifnames=0" else None
    _legacy_ifcfg(tmp_path, *([grub] if grub else []))
    plan = T.plan(nic="eth0") if case == "plan.nic" else T.plan()
    if case == "udev mask":
        (tmp_path / "etc/udev/rules.d").mkdir(parents=True)
        (tmp_path / "etc/udev/rules.d/80-net-setup-link.rules").symlink_to("/dev/null")
    if case == "NetworkManager":
        T.executable(tmp_path, NM)
    if case == "DEVICE=ens3":
        T.put(
            tmp_path, IFCFG_PATH, "DEVICE=ens3\nBOOTPROTO=none\nIPADDR=203.0.113.10\nONBOOT=yes\n"
        )
    run(tmp_path, plan)
    converted = T.read(tmp_path, IFCFG_PATH)
    assert "BOOTPROTO=dhcp\n" in converted and "IPADDR" not in converted


def test_commented_net_ifnames_does_not_count(tmp_path: Path) -> None:
    _legacy_ifcfg(tmp_path, '#GRUB_CMDLINE_LINUX="net.ifnames=0"\nGRUB_CMDLINE_LINUX="quiet"\n')
    with pytest.raises(FixupFailed, match="binds the first NIC to eth0"):
        run(tmp_path)


def test_receiver_leaves_nic_unknown_and_takes_the_agents_addresses() -> None:
    """The rescue system's NIC name is a guess: the receiver must not pin it (see the hook).
    The source's addresses come from the agent's layout; what is not an address is dropped,
    and an older agent's layout has none."""
    layout: dict[str, object] = {"disks": {}, "mounts": [], "swap": []}
    plan, _ = plan_from_prepare(layout, {"filesystems": {}}, {})
    assert (plan.nic, plan.static_addresses) == ("", ())
    layout["addresses"] = ["192.0.2.10/24", "2001:db8::10/64", ".*", 7, None]
    plan, _ = plan_from_prepare(layout, {"filesystems": {}}, {})
    assert (plan.nic, plan.static_addresses) == ("", ("192.0.2.10/24", "2001:db8::10/64"))


# -- finding 7b: an ifupdown bridge on the source's NIC ---------------------------------------

BRIDGE = """\
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet manual

auto vmbr0
iface vmbr0 inet static
\taddress 203.0.113.10/24
\tgateway 203.0.113.1
\tbridge-ports eth0
\tbridge-stp off
"""


def _bridge_tree(root: Path, interfaces: str = BRIDGE) -> None:
    T.put(root, "/etc/network/interfaces", interfaces)
    T.executable(root, "/usr/sbin/dhclient")


def test_bridge_on_source_nic_fails_without_a_name(tmp_path: Path) -> None:
    _bridge_tree(tmp_path)
    with pytest.raises(FixupFailed) as info:
        run(tmp_path)
    assert info.value.reason.startswith(
        "network: /etc/network/interfaces:11: iface vmbr0 is built on the source's NIC eth0"
    )
    assert T.read(tmp_path, "/etc/network/interfaces") == BRIDGE  # nothing half-written


def test_bridge_without_a_port_stanza_fails(tmp_path: Path) -> None:
    interfaces = "auto vmbr0\niface vmbr0 inet static\n\taddress 203.0.113.10/24\n"
    _bridge_tree(tmp_path, interfaces + "\tbridge_ports eth0\n")
    with pytest.raises(FixupFailed, match="iface vmbr0 is built on the source's NIC eth0"):
        run(tmp_path)


def test_bridge_port_renamed_to_known_nic(tmp_path: Path) -> None:
    _bridge_tree(tmp_path)
    run(tmp_path, T.plan(nic="ens3"))
    assert T.read(tmp_path, "/etc/network/interfaces") == (
        "auto lo\niface lo inet loopback\n\nauto ens3\niface ens3 inet manual\n\n"
        "auto vmbr0\niface vmbr0 inet dhcp\n\tbridge-ports ens3\n\tbridge-stp off\n"
    )


def test_bridge_on_another_nic_is_left(tmp_path: Path) -> None:
    interfaces = BRIDGE.replace("bridge-ports eth0", "bridge-ports eth1")
    _bridge_tree(tmp_path, interfaces)
    run(tmp_path, T.plan(nic="ens3"))  # a known name, which a port on eth0 would take
    assert "\tbridge-ports eth1\n" in T.read(tmp_path, "/etc/network/interfaces")


def test_static_stanza_loses_commands_on_its_old_network(tmp_path: Path) -> None:
    """The receiver does not know the source's addresses, but a static stanza names its
    network: an `up` route via a next hop on it, or an alias on it, would fail (or take an
    address that is not ours) on the destination. Commands naming other networks stay."""
    interfaces = (
        "auto eth0\niface eth0 inet static\n\taddress 192.0.2.10\n\tnetmask 255.255.255.0\n"
        "\tgateway 192.0.2.1\n"
        "\tup ip route add 10.0.0.0/8 via 192.0.2.254\n"
        "\tpost-up ip addr add 192.0.2.11/24 dev eth0 || true\n"
        "\tup ip route add 198.51.100.0/24 via 198.51.100.1 dev tun0\n"
        "\tup echo 192.0.2.300 is not an address\n"
        "iface eth0 inet6 static\n\taddress 2001:db8:1::10/64\n"
        "\tup ip -6 route add 2001:db8:ff::/48 via 2001:db8:1::1\n"
        "\tup ip -6 route add 2001:db8:ee::/48 via fe80::1 dev eth0\n"
    )
    plan = FixupPlan(T.plan().filesystems)  # no addresses known, as from the receiver
    T.put(tmp_path, "/etc/network/interfaces", interfaces)
    T.executable(tmp_path, "/usr/sbin/dhclient")
    run(tmp_path, plan)
    assert T.read(tmp_path, "/etc/network/interfaces") == (
        "auto /e*/1=eth0\niface eth0 inet dhcp\n"
        "\tup ip route add 198.51.100.0/24 via 198.51.100.1 dev tun0\n"
        "\tup echo 192.0.2.300 is not an address\n"
        "iface eth0 inet6 auto\n"
        "\tup ip -6 route add 2001:db8:ee::/48 via fe80::1 dev eth0\n"
    )
