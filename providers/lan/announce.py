"""Telling the LAN that an address moved: gratuitous ARP (IPv4) and unsolicited neighbour
advertisements (IPv6), sent from raw sockets in pure Python.

The sockets stay open for the life of the provider: closing a raw socket costs 4-8 ms (measured),
which a failover should not pay. Neither socket ever receives anything: the packet socket is opened
with protocol 0 (no frames delivered) and the ICMPv6 socket filters out every type.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPOP_REQUEST = 1
ICMP6_FILTER = 1  # <linux/icmpv6.h>, level IPPROTO_ICMPV6
ND_NEIGHBOR_ADVERT = 136
ND_OPT_TARGET_LLADDR = 2
NA_FLAG_OVERRIDE = 0x20000000
ALL_NODES = "ff02::1"
BROADCAST = b"\xff" * 6


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def garp_frame(mac: str, address: ipaddress.IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request with sender = target = `address` (RFC 5227's announcement).

    Linux neighbours update an existing entry from it at once, even within their locktime, and
    create none (arp_accept=0), which is what a move needs."""
    src = mac_bytes(mac)
    ip = address.packed
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, ARPOP_REQUEST, src, ip, b"\0" * 6, ip)
    frame = BROADCAST + src + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(60, b"\0")  # minimum Ethernet payload; veth does not pad for us


def unsolicited_na(mac: str, address: ipaddress.IPv6Address) -> bytes:
    """ICMPv6 neighbour advertisement for `address`: Override set, Solicited clear, with the target
    link-layer address option. The checksum is left 0: the kernel fills it on a raw ICMPv6 socket."""
    header = struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE)
    option = struct.pack("!BB6s", ND_OPT_TARGET_LLADDR, 1, mac_bytes(mac))
    return header + address.packed + option


class Announcer:
    """One raw socket for one address family, opened on first use and kept until `close()`."""

    def __init__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address):
        self.address = address
        self._sock: socket.socket | None = None

    def open(self) -> None:
        """Open the socket now (raises OSError: EPERM without CAP_NET_RAW)."""
        if self._sock is not None:
            return
        if self.address.version == 4:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        else:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            try:
                sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, b"\xff" * 32)  # block every type
                # RFC 4861: receivers drop neighbour discovery packets whose hop limit is not 255.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)  # a full send buffer must never stall the event loop
        self._sock = sock

    def send(self, ifname: str, ifindex: int, mac: str) -> None:
        """Send one announcement on the interface (raises OSError, e.g. ENETDOWN)."""
        self.open()
        assert self._sock is not None
        if isinstance(self.address, ipaddress.IPv4Address):
            self._sock.sendto(garp_frame(mac, self.address), (ifname, ETH_P_ARP))
            return
        # The VIP itself as source (it is nodad, so usable at once); the interface by index.
        pktinfo = self.address.packed + struct.pack("@I", ifindex)
        self._sock.sendmsg([unsolicited_na(mac, self.address)],
                           [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)],
                           0, (ALL_NODES, 0, 0, ifindex))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
