"""What the LAN provider adds to the contract: its settings, its packets, nodad, announcements."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import socket
import struct
import time
from typing import Any

import pytest
from safekit_cloud.core.lab import Lab
from safekit_cloud.providers.base import ProviderConfigError, create_provider, validate_settings
from safekit_cloud.providers.lan.announce import ETH_P_ARP, garp_frame, unsolicited_na
from safekit_cloud.providers.lan.provider import LanProvider

NODES = ["n1", "n2"]
VIP = "198.18.0.100/24"
MAC = "02:00:5e:10:00:01"


# ---- settings -----------------------------------------------------------------------------------

def test_per_node_interfaces_override_the_default() -> None:
    settings = {"interface": "eth0", "interfaces": {"n2": "ens5"}}
    assert create_provider("lan", VIP, settings, "n1", NODES).ifname == "eth0"  # type: ignore[attr-defined]
    assert create_provider("lan", VIP, settings, "n2", NODES).ifname == "ens5"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("settings", "message"), [
    ({"interface": "eth0", "interfaces": {"n3": "eth1"}}, "'n3' is not a node"),
    ({}, "interface: Field required"),
    ({"interface": "eth0 1"}, "interface: String should match"),
    ({"interface": "a-very-long-name0"}, "interface: String should match"),
    ({"interface": "eth0", "interfaces": {"n1": "x/y"}}, "interfaces.n1"),
    ({"interface": "eth0", "garp_count": -1}, "garp_count"),
    ({"interface": "eth0", "garp_interval": 0}, "garp_interval"),
    ({"interface": "eth0", "arp": True}, "arp: Extra inputs are not permitted"),
])
def test_bad_settings_are_named(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ProviderConfigError, match=message):
        validate_settings("lan", settings, NODES)


def test_detects_everywhere_and_breaks_before_making() -> None:
    assert LanProvider._detect() is True
    assert LanProvider.make_before_break is False


# ---- packets ------------------------------------------------------------------------------------

def test_gratuitous_arp_is_a_broadcast_request_for_the_vip_itself() -> None:
    ip = ipaddress.IPv4Address("198.18.0.100")
    frame = garp_frame(MAC, ip)
    assert len(frame) == 60
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex("02005e100001")
    assert struct.unpack("!H", frame[12:14])[0] == ETH_P_ARP
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert sha == frame[6:12] and spa == tpa == ip.packed and tha == b"\0" * 6


def test_unsolicited_na_overrides_and_carries_the_link_layer_address() -> None:
    ip = ipaddress.IPv6Address("fd00:198:18::100")
    packet = unsolicited_na(MAC, ip)
    kind, code, checksum, flags = struct.unpack("!BBHI", packet[:8])
    assert (kind, code, checksum) == (136, 0, 0)  # the kernel fills the checksum
    assert flags == 0x20000000  # Override only: not a router, not solicited
    assert packet[8:24] == ip.packed
    assert packet[24:26] == b"\x02\x01" and packet[26:32] == bytes.fromhex("02005e100001")


# ---- in a lab -----------------------------------------------------------------------------------

@pytest.fixture
def pair(lab: Lab) -> Lab:
    lab.add_network("lan")
    lab.add_host("n1", {"lan": ["198.18.0.1/24", "fd00:198:18::1/64"]})
    lab.add_host("n2", {"lan": ["198.18.0.2/24", "fd00:198:18::2/64"]})
    return lab


def _in(lab: Lab, host: str, coro_fn: Any, *args: Any) -> Any:
    with lab.inside(host):
        return asyncio.run(coro_fn(*args))


async def _take_hold(vip: str, node: str, settings: dict[str, Any], hold: float = 0.0) -> Any:
    provider = create_provider("lan", vip, {"interface": "eth0", **settings}, node, NODES)
    try:
        result = await provider.take()
        await asyncio.sleep(hold)
        return result, await provider.holder()
    finally:
        await provider.close()


def _vip_flags(lab: Lab, host: str, ip: str) -> list[str] | None:
    for entry in json.loads(lab.run(host, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)[0]["addr_info"]:
        if entry["local"] == ip:
            return [k for k in ("nodad", "dadfailed", "tentative") if entry.get(k)]
    return None


def test_ipv6_vip_is_nodad_and_replaces_a_copy_that_failed_dad(pair: Lab) -> None:
    vip, ip = "fd00:198:18::100/64", "fd00:198:18::100"
    _in(pair, "n2", _take_hold, vip, "n2", {})
    pair.run("n1", ["ip", "addr", "add", vip, "dev", "eth0"])  # with DAD: n2 answers, n1's copy fails
    deadline = time.monotonic() + 5
    while _vip_flags(pair, "n1", ip) != ["dadfailed", "tentative"]:
        assert time.monotonic() < deadline, _vip_flags(pair, "n1", ip)
        time.sleep(0.05)
    result, holder = _in(pair, "n1", _take_hold, vip, "n1", {})
    assert result.changed and holder == "n1"
    assert _vip_flags(pair, "n1", ip) == ["nodad"]


def test_announcements_are_counted_spaced_and_stop_on_release(pair: Lab) -> None:
    with pair.inside("n2"):  # n2 listens for ARP on the switch
        listener = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        listener.bind(("eth0", 0))
        listener.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        result, _ = _in(pair, "n1", _take_hold, VIP, "n1", {"garp_count": 3, "garp_interval": 0.1}, 0.35)
        assert result.seconds < 0.1  # take() does not wait for the repeats
        sent = _garps(listener, "198.18.0.100")
        assert len(sent) == 3
        assert all(0.08 < later - earlier < 0.3 for earlier, later in itertools.pairwise(sent)), sent

        async def take_then_release() -> None:
            provider = create_provider("lan", VIP, {"interface": "eth0", "garp_count": 5,
                                                    "garp_interval": 0.1}, "n1", NODES)
            await provider.take()
            await provider.release()
            await asyncio.sleep(0.3)
            await provider.close()
        _in(pair, "n1", take_then_release)
        assert len(_garps(listener, "198.18.0.100")) == 1
    finally:
        listener.close()


SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>; Python does not export it


def _garps(listener: socket.socket, ip: str) -> list[float]:
    """Kernel receive times of the gratuitous ARPs for `ip` queued on the listener."""
    times, packed = [], socket.inet_aton(ip)
    listener.settimeout(0.2)
    while True:
        try:
            frame, ancillary, _, _ = listener.recvmsg(128, socket.CMSG_SPACE(16))
        except TimeoutError:
            return times
        op, spa, tpa = struct.unpack("!H", frame[20:22])[0], frame[28:32], frame[38:42]
        if op == 1 and spa == tpa == packed:
            seconds, nanos = struct.unpack("@qq", ancillary[0][2][:16])
            times.append(seconds + nanos / 1e9)


def test_check_reports_a_down_interface_and_a_pulled_cable(pair: Lab) -> None:
    async def check() -> list[str]:
        provider = create_provider("lan", VIP, {"interface": "eth0"}, "n1", NODES)
        try:
            return await provider.check()
        finally:
            await provider.close()
    pair.cut("n1", "lan")
    assert any("no carrier" in p for p in _in(pair, "n1", check))
    pair.restore("n1", "lan")
    pair.run("n1", ["ip", "link", "set", "eth0", "down"])
    assert any("eth0 on node n1 is down" in p for p in _in(pair, "n1", check))


def test_missing_interface_is_a_config_error_naming_the_setting(pair: Lab) -> None:
    async def take() -> None:
        provider = create_provider("lan", VIP, {"interface": "eth0", "interfaces": {"n1": "eth9"}}, "n1", NODES)
        try:
            await provider.take()
        finally:
            await provider.close()
    with pytest.raises(ProviderConfigError, match="interface eth9 does not exist on node n1: fix vip.interfaces.n1"):
        _in(pair, "n1", take)
