"""The guest's network stack, small: struct net_device and its TX queues (net/core/dev.c),
ARP with a neighbour table (net/ipv4/arp.c), IPv4 and UDP output and input
(ip_output.c, udp.c), ICMP echo, and UDP sockets for the guest programs.

Frames are built straight into sk_buffs in guest RAM: one header pack and one payload copy
per datagram, checksums computed by ``common.inet``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from common.inet import (
    ARP,
    ARPOP_REPLY,
    ARPOP_REQUEST,
    BROADCAST_MAC,
    ETH,
    ETH_HLEN,
    ETH_IP_UDP,
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
    UDP_MAX_PAYLOAD,
    csum_fold,
    csum_partial,
    ip_aton,
    pseudo_header_sum,
)
from common.trace import trace_event, traced
from guestproc.dev_addr_lists import NETDEV_UP, dev_mc_add, register_netdevice_notifier
from guestproc.kernel import Kernel
from guestproc.mm import CHECKSUM_NONE, CHECKSUM_PARTIAL, SkbPool, SkBuff

NETDEV_TX_OK = 0
NETDEV_TX_BUSY = 0x10
IGMP_ALL_HOSTS = bytes([224, 0, 0, 1])
IP_DF = 0x4000
UDP_SOCK_RCVQ_MAX = 4096

trace_net_dev_xmit = trace_event("net_dev_xmit")
trace_netif_receive_skb = trace_event("netif_receive_skb")
trace_udp_sendmsg = trace_event("udp_sendmsg")
trace_udp_rcv = trace_event("udp_rcv")
trace_recvfrom = trace_event("recvfrom")


def ip_eth_mc_map(addr: bytes) -> bytes:
    """The Ethernet multicast address of an IPv4 group: 01:00:5e and its low 23 bits."""
    return b"\x01\x00\x5e" + bytes([addr[1] & 0x7F]) + addr[2:4]


class NetDevice:
    """struct net_device: name, address, TX queue state and counters."""

    def __init__(self, name: str, dev_addr: bytes, num_tx_queues: int = 1) -> None:
        self.name = name
        self.dev_addr = dev_addr
        self.mtu = 1500
        self.priv: Any = None
        self.ndo_start_xmit: Callable[[SkBuff, NetDevice], int] | None = None
        self.ndo_open: Callable[[NetDevice], None] | None = None
        self.ndo_set_rx_mode: Callable[[NetDevice], None] | None = None
        self.flags = 0  # IFF_UP, IFF_PROMISC, ... (guestproc.dev_addr_lists)
        self.uc: dict[bytes, int] = {}  # secondary unicast addresses, with references
        self.mc: dict[bytes, int] = {}  # multicast addresses, with references
        self.tx_stopped = [False] * num_tx_queues
        self.tx_locked = [False] * num_tx_queues  # each TX queue's _xmit_lock
        self.real_num_tx_queues = num_tx_queues
        self.xmit_more = False
        self.hw_csum = False  # NETIF_F_HW_CSUM: the device completes a partial checksum
        self.stats = {"tx_packets": 0, "tx_bytes": 0, "tx_dropped": 0, "tx_busy": 0,
                      "rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0, "rx_errors": 0}


def netif_stop_subqueue(dev: NetDevice, q: int) -> None:
    dev.tx_stopped[q] = True


def netif_start_subqueue(dev: NetDevice, q: int) -> None:
    dev.tx_stopped[q] = False


netif_wake_subqueue = netif_start_subqueue


def netif_tx_queue_stopped(dev: NetDevice, q: int) -> bool:
    return dev.tx_stopped[q]


def netif_device_detach(dev: NetDevice) -> None:
    """The device is away (being reset): every TX queue stops."""
    for q in range(len(dev.tx_stopped)):
        netif_stop_subqueue(dev, q)


def netif_device_attach(dev: NetDevice) -> None:
    for q in range(len(dev.tx_stopped)):
        netif_wake_subqueue(dev, q)


def __netif_tx_trylock(dev: NetDevice, q: int) -> bool:
    """Take TX queue ``q``'s lock unless someone holds it (start_xmit, here interrupted)."""
    if dev.tx_locked[q]:
        return False
    dev.tx_locked[q] = True
    return True


def __netif_tx_unlock(dev: NetDevice, q: int) -> None:
    dev.tx_locked[q] = False


def netdev_xmit_more(dev: NetDevice) -> bool:
    return dev.xmit_more


def skb_tx_hash(dev: NetDevice, sport: int, dport: int) -> int:
    """netdev_pick_tx: a flow stays on one TX queue; flows spread over the queues."""
    return ((sport * 0x9E3779B1 ^ dport) >> 7) % dev.real_num_tx_queues


@traced
def dev_queue_xmit(skb: SkBuff, dev: NetDevice, queue: int = 0, more: bool = False) -> int:
    """Hand a frame to the driver (no qdisc: the caller waits while the queue is stopped)."""
    skb.queue_mapping = queue
    if dev.tx_stopped[queue]:
        dev.stats["tx_busy"] += 1
        return NETDEV_TX_BUSY
    dev.xmit_more = more
    if trace_net_dev_xmit.on:
        trace_net_dev_xmit(dev=dev.name, len=skb.len, queue=queue)
    dev.tx_locked[queue] = True  # HARD_TX_LOCK
    try:
        return dev.ndo_start_xmit(skb, dev)  # type: ignore[misc]
    finally:
        dev.tx_locked[queue] = False


class UdpSocket:
    """A UDP socket of the guest: bind, sendto, recvfrom."""

    def __init__(self, stack: GuestStack) -> None:
        self.stack = stack
        self.port = 0
        self.rcvq: deque[tuple[bytes, tuple[str, int], int]] = deque()
        self.drops = 0

    def bind(self, port: int) -> None:
        self.stack.udp_bind(self, port)

    def sendto(self, payload: bytes | memoryview, addr: tuple[str, int], more: bool = False) -> int:
        if not self.port:
            self.stack.udp_bind(self, 0)
        return self.stack.udp_sendmsg(self, payload, addr, more)

    def recvfrom(self, timeout_s: float | None = None) -> tuple[bytes, tuple[str, int], int] | None:
        """The next datagram, its source and its arrival time (ns); None on timeout."""
        if not self.rcvq:
            self.stack.kernel.wait_event(lambda: bool(self.rcvq), timeout_s)
        r = self.rcvq.popleft() if self.rcvq else None
        if trace_recvfrom.on and r is not None:
            trace_recvfrom(port=self.port, len=len(r[0]), seq=int.from_bytes(r[0][:8], "big"))
        return r


class GuestStack:
    """The guest's IPv4 host: 10.0.2.15 behind slirp's gateway 10.0.2.2."""

    def __init__(self, kernel: Kernel, ram: memoryview, dev: NetDevice, pool: SkbPool,
                 ip: str = "10.0.2.15", gateway: str = "10.0.2.2",
                 static_neigh: dict[str, bytes] | None = None) -> None:
        self.kernel = kernel
        self.ram = ram
        self.dev = dev
        self.pool = pool
        self.ip = ip_aton(ip)
        self.gateway = ip_aton(gateway)
        self.neigh: dict[bytes, bytes] = {ip_aton(k): v for k, v in (static_neigh or {}).items()}
        self.arp_queue: dict[bytes, list[SkBuff]] = {}
        self.sockets: dict[int, UdpSocket] = {}
        self.next_ephemeral = 32768
        self.ip_id = 0
        self.ping_replies: deque[tuple[int, int]] = deque()
        self._routes: dict[str, tuple[bytes, int, int]] = {}
        self.counters = {"arp_requests_sent": 0, "arp_replies_rcvd": 0, "arp_requests_rcvd": 0,
                         "udp_no_port": 0, "csum_errors": 0, "csum_offloaded": 0,
                         "icmp_echo_replies": 0}
        register_netdevice_notifier(self.inetdev_event)
        # IPv4 header fields that never change for this host: their checksum share, once
        self._ip_const = csum_partial(IPV4.pack(0x45, 0, 0, 0, IP_DF, 64, IPPROTO_UDP, 0,
                                                self.ip, b"\0\0\0\0"))

    # -- multicast (net/ipv4/devinet.c, igmp.c) --------------------------------------------------

    def inetdev_event(self, event: int, dev: NetDevice) -> None:
        if event == NETDEV_UP and dev is self.dev:
            self.ip_mc_up()

    def ip_mc_up(self) -> None:
        """Join 224.0.0.1 (all hosts): its MAC goes on the device's multicast list. IGMP sends
        no report for this group."""
        dev_mc_add(self.dev, ip_eth_mc_map(IGMP_ALL_HOSTS))

    # -- sockets --------------------------------------------------------------------------------

    def socket(self) -> UdpSocket:
        return UdpSocket(self)

    def udp_bind(self, sock: UdpSocket, port: int) -> None:
        if port == 0:
            while self.next_ephemeral in self.sockets:
                self.next_ephemeral += 1
            port = self.next_ephemeral
            self.next_ephemeral += 1
        if port in self.sockets:
            raise OSError(98, f"port {port} in use")
        sock.port = port
        self.sockets[port] = sock

    # -- output ---------------------------------------------------------------------------------

    def alloc_skb_wait(self) -> SkBuff:
        skb = self.pool.alloc_skb()
        if skb is None:  # sk_wait_memory: sleep until TX completions return buffers
            self.kernel.wait_event(lambda: bool(self.pool.free))
            skb = self.pool.alloc_skb()
        assert skb is not None
        return skb

    def next_hop_mac(self, daddr: bytes) -> bytes | None:
        """The gateway's MAC for anything off-link; None until ARP resolves it."""
        return self.neigh.get(self.gateway if daddr[:3] != self.ip[:3] else daddr)

    def udp_route(self, dest: str) -> tuple[bytes, int, int]:
        """What a destination fixes for every datagram to it: its address, the address's
        share of the IPv4 checksum, and the UDP pseudo header's share (length excluded)."""
        daddr = ip_aton(dest)
        return daddr, int.from_bytes(daddr, "big"), pseudo_header_sum(self.ip, daddr,
                                                                      IPPROTO_UDP, 0)

    @traced
    def udp_sendmsg(self, sock: UdpSocket, payload: bytes | memoryview, addr: tuple[str, int],
                    more: bool = False) -> int:
        self.kernel.cpu.interrupt_window()
        n = len(payload)
        if n > UDP_MAX_PAYLOAD:
            raise OSError(90, f"message too long ({n} > {UDP_MAX_PAYLOAD})")
        route = self._routes.get(addr[0])
        if route is None:
            route = self._routes[addr[0]] = self.udp_route(addr[0])
        daddr, daddr_sum, pseudo_base = route
        dport = addr[1]
        skb = self.alloc_skb_wait()
        off = skb.data
        self.ram[off + 42 : off + 42 + n] = payload
        udp_len = UDP_HLEN + n
        tot_len = IP_HLEN + udp_len
        self.ip_id = ip_id = (self.ip_id + 1) & 0xFFFF
        ip_csum = csum_fold(self._ip_const + tot_len + ip_id + daddr_sum)
        if self.dev.hw_csum:  # udp4_hwcsum: the pseudo header's sum, the device does the rest
            udp_csum = 0xFFFF - csum_fold(pseudo_base + udp_len)
            skb.ip_summed = CHECKSUM_PARTIAL
            skb.csum_start = ETH_HLEN + IP_HLEN
            skb.csum_offset = 6  # offsetof(struct udphdr, check)
        else:
            udp_acc = pseudo_base + 2 * udp_len + sock.port + dport  # pseudo + UDP header lengths
            udp_csum = csum_fold(csum_partial(payload, udp_acc))
        if trace_udp_sendmsg.on:
            trace_udp_sendmsg(sport=sock.port, dport=dport, len=n,
                              seq=int.from_bytes(payload[:8], "big") if n >= 8 else -1)
        dst = self.next_hop_mac(daddr)
        ETH_IP_UDP.pack_into(self.ram, off, dst or BROADCAST_MAC, self.dev.dev_addr, ETH_P_IP,
                             0x45, 0, tot_len, ip_id, IP_DF, 64, IPPROTO_UDP, ip_csum,
                             self.ip, daddr, sock.port, dport, udp_len, udp_csum)
        skb.len = ETH_HLEN + tot_len
        dev = self.dev
        # netdev_core_pick_tx: a device with one TX queue needs no hash
        skb.queue_mapping = skb_tx_hash(dev, sock.port, dport) if dev.real_num_tx_queues != 1 \
            else 0
        if dst is None:
            self.arp_resolve(daddr, skb)
            return n
        self.xmit(skb, more)
        return n

    def xmit(self, skb: SkBuff, more: bool = False) -> None:
        q = skb.queue_mapping
        while dev_queue_xmit(skb, self.dev, q, more) == NETDEV_TX_BUSY:
            self.kernel.wait_event(lambda: not self.dev.tx_stopped[q])

    def send_frame(self, frame: bytes) -> None:
        skb = self.alloc_skb_wait()
        self.ram[skb.data : skb.data + len(frame)] = frame
        skb.len = len(frame)
        self.xmit(skb)

    # -- ARP ------------------------------------------------------------------------------------

    def arp_resolve(self, daddr: bytes, skb: SkBuff) -> None:
        """No neighbour entry: park the frame and ask who has the next hop."""
        nh = self.gateway if daddr[:3] != self.ip[:3] else daddr
        queue = self.arp_queue.setdefault(nh, [])
        queue.append(skb)
        if len(queue) == 1:
            self.arp_send(ARPOP_REQUEST, nh, BROADCAST_MAC, b"\0" * 6)

    def arp_send(self, op: int, tip: bytes, dest: bytes, tha: bytes) -> None:
        frame = ETH.pack(dest, self.dev.dev_addr, ETH_P_ARP) + ARP.pack(
            1, ETH_P_IP, 6, 4, op, self.dev.dev_addr, self.ip, tha, tip)
        if op == ARPOP_REQUEST:
            self.counters["arp_requests_sent"] += 1
        self.send_frame(frame)

    def arp_rcv(self, frame: memoryview) -> None:
        _, _, _, _, op, sha, sip, _, tip = ARP.unpack_from(frame, ETH_HLEN)
        if tip != self.ip:
            return
        self.neigh[bytes(sip)] = bytes(sha)
        if op == ARPOP_REQUEST:
            self.counters["arp_requests_rcvd"] += 1
            self.arp_send(ARPOP_REPLY, bytes(sip), bytes(sha), bytes(sha))
        elif op == ARPOP_REPLY:
            self.counters["arp_replies_rcvd"] += 1
        for skb in self.arp_queue.pop(bytes(sip), []):
            self.ram[skb.data : skb.data + 6] = sha
            self.xmit(skb)

    # -- input ----------------------------------------------------------------------------------

    @traced
    def netif_receive_skb(self, frame: memoryview, ip_summed: int = CHECKSUM_NONE) -> None:
        """A frame the driver received; it is copied out before the buffer is reused.
        ``ip_summed``: CHECKSUM_UNNECESSARY or PARTIAL (the host vouched for the checksum)."""
        if trace_netif_receive_skb.on:
            trace_netif_receive_skb(dev=self.dev.name, len=len(frame))
        if len(frame) < ETH_HLEN:
            self.dev.stats["rx_errors"] += 1
            return
        proto = int.from_bytes(frame[12:14], "big")
        if proto == ETH_P_ARP:
            self.arp_rcv(frame)
        elif proto == ETH_P_IP:
            self.ip_rcv(frame[ETH_HLEN:], ip_summed)

    @traced
    def ip_rcv(self, pkt: memoryview, ip_summed: int = CHECKSUM_NONE) -> None:
        if len(pkt) < IP_HLEN:
            self.dev.stats["rx_errors"] += 1
            return
        ver_ihl, _, tot_len, _, _, _, proto, _, saddr, daddr = IPV4.unpack_from(pkt, 0)
        ihl = (ver_ihl & 0xF) * 4
        if ver_ihl >> 4 != 4 or tot_len > len(pkt) or csum_partial(pkt[:ihl]) % 0xFFFF:
            self.counters["csum_errors"] += 1
            return
        if daddr != self.ip:
            return
        body = pkt[ihl:tot_len]
        if proto == IPPROTO_UDP:
            self.udp_rcv(saddr, daddr, body, ip_summed)
        elif proto == IPPROTO_ICMP:
            self.icmp_rcv(saddr, body)

    @traced
    def udp_rcv(self, saddr: bytes, daddr: bytes, seg: memoryview,
                ip_summed: int = CHECKSUM_NONE) -> None:
        sport, dport, length, check = UDP.unpack_from(seg, 0)
        if ip_summed != CHECKSUM_NONE:  # skb_csum_unnecessary: the host vouched for it
            self.counters["csum_offloaded"] += 1
        elif check and csum_partial(seg[:length],
                                  pseudo_header_sum(saddr, daddr, IPPROTO_UDP, length)) % 0xFFFF:
            self.counters["csum_errors"] += 1
            return
        sock = self.sockets.get(dport)
        if sock is None:
            self.counters["udp_no_port"] += 1
            return
        if len(sock.rcvq) >= UDP_SOCK_RCVQ_MAX:
            sock.drops += 1
            return
        if trace_udp_rcv.on:
            trace_udp_rcv(sport=sport, dport=dport, len=length - UDP_HLEN,
                          seq=int.from_bytes(seg[UDP_HLEN:UDP_HLEN + 8], "big"))
        sock.rcvq.append((bytes(seg[UDP_HLEN:length]),
                          (".".join(map(str, saddr)), sport), self.kernel.now_ns()))

    def icmp_rcv(self, saddr: bytes, body: memoryview) -> None:
        icmp_type, _, _, ident, seq = ICMP_ECHO_HDR.unpack_from(body, 0)
        if icmp_type == ICMP_ECHOREPLY:
            self.counters["icmp_echo_replies"] += 1
            self.ping_replies.append((ident, seq))

    def send_ping(self, daddr: str, ident: int, seq: int, payload: bytes = b"") -> None:
        dst_ip = ip_aton(daddr)
        icmp = ICMP_ECHO_HDR.pack(ICMP_ECHO, 0, 0, ident, seq) + payload
        icmp = icmp[:2] + csum_fold(csum_partial(icmp)).to_bytes(2, "big") + icmp[4:]
        tot_len = IP_HLEN + len(icmp)
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        hdr = bytearray(IPV4.pack(0x45, 0, tot_len, self.ip_id, IP_DF, 64, IPPROTO_ICMP, 0,
                                  self.ip, dst_ip))
        hdr[10:12] = csum_fold(csum_partial(hdr)).to_bytes(2, "big")
        dst = self.next_hop_mac(dst_ip)
        skb = self.alloc_skb_wait()
        frame = ETH.pack(dst or BROADCAST_MAC, self.dev.dev_addr, ETH_P_IP) + bytes(hdr) + icmp
        self.ram[skb.data : skb.data + len(frame)] = frame
        skb.len = len(frame)
        if dst is None:
            self.arp_resolve(dst_ip, skb)
        else:
            self.xmit(skb)
