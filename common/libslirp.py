"""Stands for the parts of libslirp (a library QEMU links) a UDP guest touches: the user-mode
network behind ``-netdev user``, for QEMU's net/slirp.c (qemuproc/slirp.py) and the
vhost-user backend alike.

The guest is 10.0.2.15/24; slirp is the gateway and host 10.0.2.2 and the DNS 10.0.2.3.
``slirp_input`` takes the guest's frames (ARP, IPv4: UDP and ICMP echo). A guest UDP flow gets
a real host UDP socket (``udp_attach``) and each datagram to 10.0.2.2:P leaves it toward
127.0.0.1:P (``sosendto``); what comes back (``sorecvfrom``) goes to the guest from 10.0.2.2:P
via ``udp_output`` -> ``ip_output`` -> ``if_encap``. Only loopback is ever reached: any
other destination is dropped and counted. Idle flows expire and their sockets close.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.inet import (
    ARP,
    ARPOP_REPLY,
    ARPOP_REQUEST,
    BROADCAST_MAC,
    ETH,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ICMP_ECHO,
    ICMP_ECHO_HDR,
    ICMP_ECHOREPLY,
    IP_HLEN,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    IPV4,
    UDP,
    UDP_HLEN,
    csum_fold,
    csum_partial,
    ip_aton,
    pseudo_header_sum,
)
from common.trace import trace_event, traced

SO_EXPIRE_S = 240.0
TIMEOUT_SLOW_MS = 499
"""libslirp's slow timer: the longest the main loop sleeps while a flow waits to expire."""
TIMEOUT_MAX_MS = 1000
"""slirp_update_timeout never lets the main loop sleep longer than this."""
ARP_RESOLUTION_TIMEOUT_S = 1.0
SORECV_BATCH = 64
HOSTFWD_RCVBUF = 4 << 20

trace_slirp_input = trace_event("slirp_input")
trace_sosendto = trace_event("sosendto")
trace_sorecvfrom = trace_event("sorecvfrom")
trace_slirp_output = trace_event("slirp_output")


def special_ethaddr(ip: bytes) -> bytes:
    """The MAC slirp answers with for its own addresses: 52:55 then the IPv4 address."""
    return b"\x52\x55" + ip


@dataclass
class SlirpSocket:
    """struct socket for a UDP flow: the guest end (laddr:lport) and its host socket."""

    laddr: bytes
    lport: int
    s: socket.socket
    faddr: bytes = b"\0\0\0\0"
    fport: int = 0
    expire: float = 0.0
    hostfwd: bool = False
    queue: int = 0
    sent: int = 0
    received: int = 0


class Slirp:
    def __init__(self, send_packet: Callable[[bytes, int], int],
                 udp_expire_s: float = SO_EXPIRE_S,
                 host_ip: str = "127.0.0.1") -> None:
        self.vnetwork = ip_aton("10.0.2.0")
        self.vhost_addr = ip_aton("10.0.2.2")
        self.vnameserver_addr = ip_aton("10.0.2.3")
        self.client_ipaddr = ip_aton("10.0.2.15")
        self.host_ip = host_ip
        self.send_packet = send_packet
        self.udp_expire_s = udp_expire_s
        self.arp_table: dict[bytes, bytes] = {}
        self.udb: dict[tuple[bytes, int], SlirpSocket] = {}
        self.by_fd: dict[int, SlirpSocket] = {}
        self.if_pending: list[tuple[float, bytes, bytes, int]] = []  # expiry, dst, packet, queue
        self.arp_requested: dict[bytes, float] = {}
        self.ip_id = 0
        self.input_queue = 0
        self.stats = {"frames_in": 0, "frames_out": 0, "arp_requests": 0, "arp_replies_sent": 0,
                      "arp_requests_sent": 0, "ip_bad": 0, "udp_bad_csum": 0,
                      "udp_sent": 0, "udp_received": 0,
                      "udp_send_errors": 0, "icmp_echo": 0, "no_route": 0, "flows_opened": 0,
                      "flows_expired": 0, "arp_drops": 0}

    # -- from the guest -----------------------------------------------------------------------

    @traced
    def slirp_input(self, pkt: memoryview | bytes) -> None:
        """One Ethernet frame from the guest. Nothing is ever handed back to be retried:
        what cannot go on is dropped, as in libslirp."""
        self.stats["frames_in"] += 1
        n = len(pkt)
        if n < ETH_HLEN:
            return
        proto = (pkt[12] << 8) | pkt[13]
        if trace_slirp_input.on:
            trace_slirp_input(len=n, proto=proto)
        if proto == ETH_P_IP:
            self.ip_input(pkt if isinstance(pkt, memoryview) else memoryview(pkt))
        elif proto == ETH_P_ARP:
            self.arp_input(pkt)

    def arp_input(self, pkt: memoryview | bytes) -> None:
        if len(pkt) < ETH_HLEN + ARP.size:
            return
        _, _, _, _, op, sha, sip, _, tip = ARP.unpack_from(pkt, ETH_HLEN)
        sha, sip, tip = bytes(sha), bytes(sip), bytes(tip)
        if op == ARPOP_REQUEST:
            self.stats["arp_requests"] += 1
            if tip[:3] == self.vnetwork[:3] and tip in (self.vhost_addr, self.vnameserver_addr):
                self.arp_table[sip] = sha
                reply = ETH.pack(sha, special_ethaddr(tip), ETH_P_ARP) + ARP.pack(
                    1, ETH_P_IP, 6, 4, ARPOP_REPLY, special_ethaddr(tip), tip, sha, sip)
                self.stats["arp_replies_sent"] += 1
                self.slirp_output(reply.ljust(64, b"\0"))
        elif op == ARPOP_REPLY:
            self.arp_table[sip] = sha
            self.if_start()

    def ip_input(self, m: memoryview) -> None:
        """The IPv4 packet after the frame's Ethernet header (m_adj(m, ETH_HLEN))."""
        ip = m[ETH_HLEN:]
        if len(ip) < IP_HLEN:
            self.stats["ip_bad"] += 1
            return
        ver_ihl, _, tot_len, _, frag, _, proto, _, saddr, daddr = IPV4.unpack_from(ip, 0)
        hlen = (ver_ihl & 0xF) << 2
        if ver_ihl >> 4 != 4 or hlen < IP_HLEN or tot_len > len(ip) or tot_len < hlen \
                or csum_partial(ip[:hlen]) % 0xFFFF or frag & 0x3FFF:
            self.stats["ip_bad"] += 1
            return
        if saddr == self.client_ipaddr and saddr not in self.arp_table:
            self.arp_table[saddr] = bytes(m[6:12])
        if proto == IPPROTO_UDP:
            self.udp_input(ip, hlen, tot_len, saddr, daddr)
        elif proto == IPPROTO_ICMP:
            self.icmp_input(saddr, daddr, ip[hlen:tot_len])

    def udp_input(self, ip: memoryview, hlen: int, tot_len: int, saddr: bytes,
                  daddr: bytes) -> None:
        """The UDP datagram in ``ip`` (header ``hlen`` bytes, ``tot_len`` in all)."""
        if tot_len - hlen < UDP_HLEN:
            self.stats["ip_bad"] += 1
            return
        sport, dport, length, check = UDP.unpack_from(ip, hlen)
        if length > tot_len - hlen or length < UDP_HLEN:
            self.stats["ip_bad"] += 1
            return
        if check:
            # the pseudo header's addresses are the 8 bytes that end an option-less IP header,
            # so they and the datagram are summed in one pass
            if hlen == IP_HLEN:
                acc = csum_partial(ip[12 : IP_HLEN + length], IPPROTO_UDP + length)
            else:
                acc = csum_partial(ip[hlen : hlen + length],
                                   pseudo_header_sum(saddr, daddr, IPPROTO_UDP, length))
            if acc % 0xFFFF:
                self.stats["udp_bad_csum"] += 1
                return
        so = self.udb.get((saddr, sport))
        if so is None:
            so = self.udp_attach(saddr, sport)
        so.faddr, so.fport = daddr, dport
        so.queue = self.input_queue
        so.expire = time.monotonic() + self.udp_expire_s
        self.sosendto(so, ip[hlen + UDP_HLEN : hlen + length], daddr, dport)

    def udp_attach(self, laddr: bytes, lport: int) -> SlirpSocket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((self.host_ip, 0))
        so = SlirpSocket(laddr, lport, s)
        self.udb[(laddr, lport)] = so
        self.by_fd[s.fileno()] = so
        self.stats["flows_opened"] += 1
        return so

    def udp_detach(self, so: SlirpSocket) -> None:
        self.udb.pop((so.laddr, so.lport), None)
        self.by_fd.pop(so.s.fileno(), None)
        so.s.close()

    @traced
    def sosendto(self, so: SlirpSocket, payload: memoryview, daddr: bytes, dport: int) -> int:
        """Send the guest's datagram from the flow's host socket: 0, or -1 if sendto failed
        (a full socket buffer's EAGAIN too). libslirp's udp_input drops the datagram then:
        nothing waits for the socket to drain, and the guest is never held back."""
        if daddr != self.vhost_addr and (daddr[:3] != self.vnetwork[:3]
                                         or daddr == self.vnameserver_addr):
            self.stats["no_route"] += 1  # only 10.0.2.2 (the host's loopback) is reachable here
            return -1
        if trace_sosendto.on:
            trace_sosendto(fd=so.s.fileno(), dport=dport, len=len(payload),
                           seq=int.from_bytes(payload[:8], "big") if len(payload) >= 8 else -1)
        try:
            so.s.sendto(payload, (self.host_ip, dport))
        except OSError:
            self.stats["udp_send_errors"] += 1
            return -1
        so.sent += 1
        self.stats["udp_sent"] += 1
        return 0

    def icmp_input(self, saddr: bytes, daddr: bytes, body: memoryview) -> None:
        if len(body) < ICMP_ECHO_HDR.size or csum_partial(body) % 0xFFFF:
            self.stats["ip_bad"] += 1
            return
        if body[0] == ICMP_ECHO and daddr in (self.vhost_addr, self.vnameserver_addr):
            self.stats["icmp_echo"] += 1
            reply = bytearray(body)
            reply[0] = ICMP_ECHOREPLY
            reply[2:4] = b"\0\0"
            reply[2:4] = csum_fold(csum_partial(reply)).to_bytes(2, "big")
            self.ip_output(daddr, saddr, IPPROTO_ICMP, bytes(reply),
                           self.input_queue)  # icmp_reflect

    # -- toward the guest ---------------------------------------------------------------------

    @traced
    def udp_output(self, so: SlirpSocket, payload: bytes, src: bytes, sport: int) -> None:
        length = UDP_HLEN + len(payload)
        acc = pseudo_header_sum(src, so.laddr, IPPROTO_UDP, length) + sport + so.lport + length
        udp = UDP.pack(sport, so.lport, length, csum_fold(csum_partial(payload, acc))) + payload
        self.ip_output(src, so.laddr, IPPROTO_UDP, udp, so.queue)

    @traced
    def ip_output(self, src: bytes, dst: bytes, proto: int, body: bytes, queue: int = 0) -> None:
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        hdr = bytearray(IPV4.pack(0x45, 0, IP_HLEN + len(body), self.ip_id, 0, 64, proto, 0,
                                  src, dst))
        hdr[10:12] = csum_fold(csum_partial(hdr)).to_bytes(2, "big")
        self.if_encap(dst, bytes(hdr) + body, queue)

    @traced
    def if_encap(self, dst: bytes, ip_pkt: bytes, queue: int = 0) -> None:
        """Prepend the Ethernet header; ``queue`` is the pair the flow last came in on."""
        mac = self.arp_table.get(dst)
        if mac is None:  # resolve the guest first; the packet waits (1 s at most)
            now = time.monotonic()
            self.if_pending.append((now + ARP_RESOLUTION_TIMEOUT_S, dst, ip_pkt, queue))
            if self.arp_requested.get(dst, 0) < now:
                self.arp_requested[dst] = now + ARP_RESOLUTION_TIMEOUT_S
                self.stats["arp_requests_sent"] += 1
                req = ETH.pack(BROADCAST_MAC, special_ethaddr(self.vhost_addr), ETH_P_ARP) + \
                    ARP.pack(1, ETH_P_IP, 6, 4, ARPOP_REQUEST, special_ethaddr(self.vhost_addr),
                             self.vhost_addr, b"\0" * 6, dst)
                self.slirp_output(req.ljust(64, b"\0"))
            return
        src_mac = special_ethaddr(bytes(ip_pkt[12:16]))
        self.slirp_output(ETH.pack(mac, src_mac, ETH_P_IP) + ip_pkt, queue)

    def if_start(self) -> None:
        now = time.monotonic()
        pending, self.if_pending = self.if_pending, []
        for expiry, dst, pkt, queue in pending:
            if dst in self.arp_table:
                self.if_encap(dst, pkt, queue)
            elif expiry > now:
                self.if_pending.append((expiry, dst, pkt, queue))
            else:
                self.stats["arp_drops"] += 1

    @traced
    def slirp_output(self, frame: bytes, queue: int = 0) -> None:
        """libslirp's send_packet callback: the frame goes to the NIC (net_slirp_send_packet)."""
        self.stats["frames_out"] += 1
        if trace_slirp_output.on:
            trace_slirp_output(len=len(frame), queue=queue)
        self.send_packet(frame, queue)

    # -- host sockets in the main loop --------------------------------------------------------

    def slirp_pollfds_fill(self, fds: list[tuple[int, int]], timeout_ms: int) -> int:
        """Detach the flows that have been idle too long, add the others' sockets to the poll
        set; returns the main loop's poll timeout (-1: none), shortened so the next idle flow
        is not missed (slirp_update_timeout)."""
        now = time.monotonic()
        slowtimo = False
        for so in list(self.udb.values()):
            if not so.hostfwd and so.expire:
                if so.expire <= now:
                    self.stats["flows_expired"] += 1
                    self.udp_detach(so)
                    continue
                slowtimo = True  # let the socket expire
        for fd in self.by_fd:
            fds.append((fd, select.POLLIN))
        t = TIMEOUT_MAX_MS if timeout_ms < 0 else min(TIMEOUT_MAX_MS, timeout_ms)
        return min(TIMEOUT_SLOW_MS, t) if slowtimo else t

    @traced
    def slirp_pollfds_poll(self, ready: dict[int, int]) -> None:
        for fd, ev in ready.items():
            so = self.by_fd.get(fd)
            if so is not None and ev & select.POLLIN:
                self.sorecvfrom(so)
        if self.if_pending:
            self.if_start()

    @traced
    def sorecvfrom(self, so: SlirpSocket) -> None:
        for _ in range(SORECV_BATCH):
            try:
                data, (host, port) = so.s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable reported on the socket
                continue
            if trace_sorecvfrom.on:
                trace_sorecvfrom(fd=so.s.fileno(), sport=port, len=len(data),
                                 seq=int.from_bytes(data[:8], "big") if len(data) >= 8 else -1)
            so.received += 1
            so.expire = time.monotonic() + self.udp_expire_s
            self.stats["udp_received"] += 1
            src = self.vhost_addr if host.startswith("127.") else ip_aton(host)
            if so.hostfwd:
                so.faddr, so.fport = src, port
            self.udp_output(so, data, src, port)

    def slirp_add_hostfwd(self, host_port: int, guest_port: int) -> int:
        """hostfwd=udp::HOSTPORT-:GUESTPORT: a host socket whose datagrams go to the guest."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HOSTFWD_RCVBUF)
        s.bind((self.host_ip, host_port))
        so = SlirpSocket(self.client_ipaddr, guest_port, s, hostfwd=True)
        self.udb[(self.client_ipaddr, guest_port)] = so
        self.by_fd[s.fileno()] = so
        return s.getsockname()[1]

    def describe(self) -> dict:
        now = time.monotonic()
        return {"stats": dict(self.stats), "flows": [
            {"guest": f"{'.'.join(map(str, so.laddr))}:{so.lport}",
             "host_socket": "{}:{}".format(*so.s.getsockname()), "hostfwd": so.hostfwd,
             "sent": so.sent, "received": so.received,
             "expires_in_s": None if so.hostfwd else round(so.expire - now, 1)}
            for so in self.udb.values()]}

    def cleanup(self) -> None:
        for so in list(self.udb.values()):
            self.udp_detach(so)
