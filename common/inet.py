"""Wire formats both ends of the link speak: Ethernet, ARP, IPv4, UDP, ICMP, and the checksum.

Shared the way <linux/if_ether.h> and <netinet/ip.h> are: the guest's stack and slirp each
build and parse frames with these, and neither imports the other.
"""

from __future__ import annotations

import struct

ETH_ALEN = 6
ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_DATA_LEN = 1500
ETH_FRAME_LEN = ETH_HLEN + ETH_DATA_LEN
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
IP_HLEN = 20
UDP_HLEN = 8
UDP_MAX_PAYLOAD = ETH_DATA_LEN - IP_HLEN - UDP_HLEN  # 1472
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ICMP_ECHOREPLY = 0
ICMP_ECHO = 8
BROADCAST_MAC = b"\xff" * 6

ETH = struct.Struct("!6s6sH")
IPV4 = struct.Struct("!BBHHHBBH4s4s")  # ver_ihl tos tot_len id frag_off ttl proto check saddr daddr
UDP = struct.Struct("!HHHH")  # source dest len check
ARP = struct.Struct("!HHBBH6s4s6s4s")  # hrd pro hln pln op sha sip tha tip
ICMP_ECHO_HDR = struct.Struct("!BBHHH")  # type code checksum id sequence
ETH_IP_UDP = struct.Struct("!6s6sHBBHHHBBH4s4sHHHH")
"""Ethernet + IPv4 (no options) + UDP headers in one go: 42 bytes."""


def csum_partial(data: bytes | memoryview, acc: int = 0) -> int:
    """Ones'-complement sum of ``data`` as 16-bit big-endian words, folded mod 0xFFFF.

    Since 2**16 == 1 (mod 0xFFFF), the sum of the words equals the whole buffer read as one
    big-endian integer, mod 0xFFFF: one C-speed conversion instead of a Python loop.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return (acc + n) % 0xFFFF


def csum_fold(acc: int) -> int:
    """The checksum field for an accumulated sum (never 0: 0 and 0xFFFF are equal here)."""
    c = 0xFFFF - (acc % 0xFFFF)
    return c if c else 0xFFFF


def ip_checksum(header: bytes | memoryview) -> int:
    return csum_fold(csum_partial(header))


def pseudo_header_sum(saddr: bytes, daddr: bytes, proto: int, length: int) -> int:
    return (int.from_bytes(saddr, "big") + int.from_bytes(daddr, "big") + proto + length) % 0xFFFF


def checksum_ok(acc: int) -> bool:
    """A region that includes its checksum field sums to zero (mod 0xFFFF)."""
    return acc % 0xFFFF == 0


def ip_aton(s: str) -> bytes:
    return bytes(int(x) for x in s.split("."))


def ip_ntoa(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def mac_ntoa(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def mac_aton(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))
