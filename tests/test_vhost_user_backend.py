"""The vhost-user backend (vhostuserproc) against a real front-end: DPDK's virtio-user PMD in
dpdk-testpmd, connected to the backend's socket, with the backend's host side the tap in its
own namespace. Frames go from the namespace through the backend to testpmd and back
(testpmd's io or icmpecho forwarding); every frame is counted at both ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pexpect
import pytest

from common import netns
from common.vhost_user_abi import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    VRING_STATE,
    VhostUserMsg,
    VhostUserRequest,
    recv_msg,
    send_msg,
)

TESTPMD = shutil.which("dpdk-testpmd")
pytestmark = [
    pytest.mark.skipif(TESTPMD is None, reason="needs dpdk-testpmd (dpdk-dev)"),
    pytest.mark.skipif(netns.privilege_problem() is not None,
                       reason=str(netns.privilege_problem())),
    pytest.mark.usefixtures("no_leftovers"),
]
ETH_IP_UDP = 14 + 20 + 8


@contextmanager
def backend(tmp_path: Path, *args: str) -> Iterator[dict]:
    """The backend as a server on a socket in ``tmp_path``: its first line, its netns;
    ``stop()`` ends it with SIGINT and gives its summary."""
    sock = tmp_path / "vu.sock"
    js = tmp_path / "summary.json"
    p = subprocess.Popen([sys.executable, "-m", "vhostuserproc", "--socket", str(sock),
                          "--server", "--summary-json", str(js), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        line = p.stdout.readline() if p.stdout else ""
        assert "listening on" in line, (line, p.stderr.read() if p.poll() is not None else "")
        m = re.search(r"in netns (vnr-[0-9a-f]+)", line)

        def stop() -> dict:
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, (p.returncode, err)
            return json.loads(js.read_text())

        yield {"sock": str(sock), "ns": m.group(1) if m else None, "stop": stop, "proc": p}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextmanager
def run_testpmd(vdev: str, queues: int, fwd: str,
                on_listen: Callable[[], None] | None = None) -> Iterator[pexpect.spawn]:
    """dpdk-testpmd with one virtio-user port, forwarding started; killed (its process
    group) and its runtime directory removed whatever happens. With ``server=1`` testpmd
    waits for its backend before its prompt: ``on_listen`` starts it."""
    prefix = f"vubt{os.getpid()}{time.monotonic_ns() % 10**6}"
    args = ["--no-huge", "-m", "1024", "--no-pci", "-l", "0-1", f"--file-prefix={prefix}",
            "--vdev", vdev, "--", "-i", "--nb-cores=1", "--total-num-mbufs=4096",
            f"--rxq={queues}", f"--txq={queues}"]
    p = pexpect.spawn(TESTPMD, args, timeout=60, encoding="utf-8")
    try:
        if on_listen is not None:
            p.expect("waiting for client connection")
            on_listen()
        p.expect("testpmd> ")
        p.sendline(f"set fwd {fwd}")
        p.expect("testpmd> ")
        p.sendline("start")
        p.expect("testpmd> ")
        yield p
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait()  # SIGKILL'd: it goes once its memory is unmapped
        except pexpect.ExceptionPexpect:
            pass
        p.close(force=True)
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
    assert not Path(f"/var/run/dpdk/{prefix}").exists()


def port_stats(p: pexpect.spawn) -> dict[str, int]:
    p.sendline("show port stats all")
    p.expect("testpmd> ")
    text = p.before
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
            for k in ("RX-packets", "RX-bytes", "TX-packets", "TX-bytes")}


def wait_stats(p: pexpect.spawn, key: str, want: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        s = port_stats(p)
        if s[key] >= want or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def in_ns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout, check=False)


SEND = """
import socket, sys
sizes = [int(x) for x in sys.argv[1].split(',')]
for i, n in enumerate(sizes):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(bytes([i & 0xff]) * n, ('10.0.2.15', 9000 + i % 32))
    s.close()
"""


PING = """
import socket, struct, sys
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(5)
good = 0
for seq in range(n):
    body = bytes([(seq + i) & 0xff for i in range(1000)])
    hdr = struct.pack('!BBHHH', 8, 0, 0, 0x77, seq)
    s.sendto(struct.pack('!BBHHH', 8, 0, csum(hdr + body), 0x77, seq) + body,
             ('10.0.2.15', 0))
    while True:
        pkt = s.recv(4096)
        icmp = pkt[(pkt[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack('!HH', icmp[4:8]) == (0x77, seq):
            good += icmp[8:] == body
            break
print(good)
"""


def send_udp(ns: str, sizes: list[int]) -> None:
    netns._ip("-n", ns, "neigh", "replace", "10.0.2.15", "lladdr", "02:00:00:00:00:01",
              "dev", netns.TAP_NAME, "nud", "permanent")
    r = in_ns(ns, sys.executable, "-c", SEND, ",".join(map(str, sizes)))
    assert r.returncode == 0, r.stderr


CONFIGS = [
    pytest.param("", 1, [64, 200, 1400] * 40, id="split-mrg-1q"),
    pytest.param(",mrg_rxbuf=0", 1, [64, 200, 1400] * 40, id="split-nomrg-1q"),
    pytest.param(",packed_vq=1", 1, [64, 200, 1400] * 40, id="packed-mrg-1q"),
    pytest.param(",packed_vq=1,mrg_rxbuf=0", 1, [64, 1400] * 40, id="packed-nomrg-1q"),
    pytest.param("", 2, [64, 1000] * 60, id="split-mrg-2q"),
    pytest.param(",packed_vq=1", 2, [64, 1000] * 60, id="packed-mrg-2q"),
    pytest.param(",mtu=9000", 1, [3000, 64, 8000] * 10, id="split-mrg-jumbo"),
    pytest.param(",packed_vq=1,mtu=9000", 1, [3000, 64, 8000] * 10, id="packed-mrg-jumbo"),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("extra,queues,sizes", CONFIGS)
def test_frames_both_ways_counted_at_both_ends(tmp_path: Path, extra: str, queues: int,
                                               sizes: list[int]) -> None:
    """Datagrams from the namespace reach testpmd through the backend's receive queues and
    come back through its transmit queues (testpmd's io forwarding): the backend's
    per-queue counts add up to testpmd's port counters, both to what was sent."""
    jumbo = "mtu=9000" in extra
    vdev_extra = extra.replace(",mtu=9000", "")
    with backend(tmp_path, "--netdev", "tap", "--queues", str(queues)) as b:
        ns = b["ns"]
        if jumbo:
            netns._ip("-n", ns, "link", "set", netns.TAP_NAME, "mtu", "9000")
        vdev = f"net_virtio_user0,path={b['sock']},queues={queues}{vdev_extra}"
        with run_testpmd(vdev, queues, "io") as p:
            send_udp(ns, sizes)
            s = wait_stats(p, "TX-packets", len(sizes))
            p.sendline("stop")
            p.expect("testpmd> ")
            s = port_stats(p)
            p.sendline("quit")
            p.expect(pexpect.EOF, timeout=30)
        summary = b["stop"]()
    want_bytes = sum(ETH_IP_UDP + n for n in sizes)
    q = summary["queues"]
    assert len(q) == queues
    rx = sum(x["rx_frames"] for x in q)
    tx = sum(x["tx_frames"] for x in q)
    assert (s["RX-packets"], s["TX-packets"]) == (len(sizes), len(sizes)), s
    assert s["RX-bytes"] == want_bytes
    assert (rx, tx) == (len(sizes), len(sizes)), q
    assert sum(x["rx_bytes"] for x in q) == want_bytes
    assert sum(x["tx_bytes"] for x in q) == s["TX-bytes"] == want_bytes
    assert not any(x["rx_dropped"] or x["tx_dropped"] for x in q), q
    if queues > 1:
        assert all(x["rx_frames"] and x["tx_frames"] for x in q), q
        for x in q:  # io forwarding sends each frame back on the queue it came in on
            assert x["rx_frames"] == x["tx_frames"], q
    assert summary["panics"] == []


@pytest.mark.timeout(180)
def test_ping_through_backend_to_testpmd_icmpecho(tmp_path: Path) -> None:
    """The namespace pings an address testpmd answers (icmpecho answers ARP and echo
    requests): every reply comes back with its payload intact, and the backend's counts
    match testpmd's."""
    with backend(tmp_path, "--netdev", "tap") as b:
        vdev = f"net_virtio_user0,path={b['sock']},queues=1"
        with run_testpmd(vdev, 1, "icmpecho") as p:
            r = in_ns(b["ns"], sys.executable, "-c", PING, "40")
            assert r.stdout.split() == ["40"], r.stdout + r.stderr
            p.sendline("stop")
            p.expect("testpmd> ")
            s = port_stats(p)
        summary = b["stop"]()
    q = summary["queues"][0]
    assert s["RX-packets"] == q["rx_frames"] >= 41  # 40 echo requests and the ARP request
    assert s["TX-packets"] == q["tx_frames"] == s["RX-packets"]


@pytest.mark.timeout(180)
def test_poll_mode_takes_no_kicks(tmp_path: Path) -> None:
    """--poll: the backend turns guest notifications off and busy-polls; the frames still
    all arrive, with far fewer kicks than frames, and its CPU time is reported."""
    sizes = [64] * 300
    with backend(tmp_path, "--netdev", "tap", "--poll") as b:
        vdev = f"net_virtio_user0,path={b['sock']},queues=1"
        with run_testpmd(vdev, 1, "io") as p:
            send_udp(b["ns"], sizes)
            s = wait_stats(p, "TX-packets", len(sizes))
            p.sendline("stop")
            p.expect("testpmd> ")
            s = port_stats(p)
        summary = b["stop"]()
    q = summary["queues"][0]
    assert s["TX-packets"] == q["tx_frames"] == q["rx_frames"] == len(sizes)
    assert q["tx_kicks"] + q["rx_kicks"] <= 2, q
    assert summary["poll"] is True and summary["cpu_s"] > 0


# -- the protocol, with this test as the front-end -------------------------------------------

@contextmanager
def connected(tmp_path: Path, *args: str) -> Iterator[tuple[socket.socket, dict]]:
    with backend(tmp_path, *args) as b:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(b["sock"])
        try:
            yield s, b
        finally:
            s.close()


def request(s: socket.socket, req: int, payload: bytes = b"", fds: list[int] | None = None,
            need_reply: bool = False) -> None:
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    send_msg(s, VhostUserMsg(req, flags, payload, fds or []))


@pytest.mark.timeout(60)
def test_reply_ack_and_get_vring_base(tmp_path: Path) -> None:
    """REPLY_ACK: a request without a reply of its own is answered u64 0 when asked;
    GET_VRING_BASE gives back the index SET_VRING_BASE set."""
    with connected(tmp_path) as (s, b):
        request(s, VhostUserRequest.GET_QUEUE_NUM)
        r = recv_msg(s)
        assert r.request == VhostUserRequest.GET_QUEUE_NUM and r.u64() == 2
        request(s, VhostUserRequest.SET_OWNER, need_reply=True)
        r = recv_msg(s)
        assert r.request == VhostUserRequest.SET_OWNER and r.u64() == 0
        request(s, VhostUserRequest.SET_VRING_BASE, VRING_STATE.pack(1, 4242))
        request(s, VhostUserRequest.GET_VRING_BASE, VRING_STATE.pack(1, 0))
        r = recv_msg(s)
        assert VRING_STATE.unpack(r.payload) == (1, 4242)
        b["stop"]()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("req,payload", [
    pytest.param(VhostUserRequest.SET_CONFIG, b"\0" * 12, id="unhandled"),
    pytest.param(VhostUserRequest.SET_VRING_NUM, VRING_STATE.pack(200, 256), id="bad-index"),
    pytest.param(VhostUserRequest.SET_VRING_NUM, b"\1", id="short-payload"),
    pytest.param(VhostUserRequest.SET_VRING_ADDR,
                 struct.pack("<IIQQQQ", 0, 0, 1 << 40, 1 << 40, 1 << 40, 0), id="addr-outside"),
])
def test_bad_request_panics_and_closes(tmp_path: Path, req: int, payload: bytes) -> None:
    """A request the backend cannot take ends in vu_panic: the connection closes, the
    process goes on and takes the next front-end."""
    with connected(tmp_path) as (s, b):
        request(s, VhostUserRequest.SET_VRING_NUM, VRING_STATE.pack(0, 256))
        request(s, req, payload)
        with pytest.raises(EOFError):
            recv_msg(s)
        s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s2.settimeout(20)
        s2.connect(b["sock"])
        request(s2, VhostUserRequest.GET_QUEUE_NUM)
        assert recv_msg(s2).u64() == 2
        s2.close()
        summary = b["stop"]()
    assert len(summary["panics"]) == 1 and summary["connections"] == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args,why", [
    (["--queues", "9"], "queue pairs"),
    (["--socket", "/nonexistent-dir/x.sock"], "cannot listen"),
])
def test_bad_input_one_line_exit_2(tmp_path: Path, args: list[str], why: str) -> None:
    base = ["--socket", str(tmp_path / "s.sock"), "--server"]
    r = subprocess.run([sys.executable, "-m", "vhostuserproc", *base, *args],
                       capture_output=True, text=True, timeout=20, check=False)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and why in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.timeout(60)
def test_kill_9_leaves_what_the_run_cleanup_removes(tmp_path: Path) -> None:
    """Killed with SIGKILL, the backend's own namespace and its owner record stay; the
    run cleanup (common/ipc.py) sees the owner dead and removes both."""
    from common import ipc

    with backend(tmp_path, "--netdev", "tap") as b:
        ns = b["ns"]
        rid = ns.removeprefix(netns.NETNS_PREFIX)
        assert netns.netns_path(ns).exists()
        assert ipc.run_owner(rid) == (b["proc"].pid, pytest.approx(
            __import__("psutil").Process(b["proc"].pid).create_time(), abs=0.01))
        assert rid not in ipc.cleanup_dead_runs()  # alive: not touched
        os.kill(b["proc"].pid, signal.SIGKILL)
        b["proc"].wait()
    assert netns.netns_path(ns).exists()
    assert rid in ipc.cleanup_dead_runs()
    assert not netns.netns_path(ns).exists()
    assert ipc.run_owner(rid) is None


@pytest.mark.timeout(180)
def test_client_mode_against_testpmd_server(tmp_path: Path) -> None:
    """testpmd's virtio-user listens (server=1) and the backend connects as a client; when
    testpmd quits the backend ends by itself, exit 0, with its summary."""
    sock = tmp_path / "pmd.sock"
    js = tmp_path / "summary.json"
    sizes = [100, 1200] * 30
    vdev = f"net_virtio_user0,path={sock},queues=1,server=1"
    b: list[subprocess.Popen] = []

    def start_backend() -> None:
        b.append(subprocess.Popen([sys.executable, "-m", "vhostuserproc", "--socket",
                                   str(sock), "--netdev", "tap", "--summary-json", str(js)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True))

    try:
        with run_testpmd(vdev, 1, "io", start_backend) as p:
            line = b[0].stdout.readline() if b[0].stdout else ""
            assert "connected to" in line, line
            ns = re.search(r"in netns (vnr-[0-9a-f]+)", line).group(1)  # type: ignore[union-attr]
            deadline = time.monotonic() + 30
            while True:  # the link comes up once the backend has the rings
                p.sendline("show port info 0")
                p.expect("testpmd> ")
                if "Link status: up" in p.before or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            send_udp(ns, sizes)
            s = wait_stats(p, "TX-packets", len(sizes))
            p.sendline("quit")
            p.expect(pexpect.EOF, timeout=30)
        _, err = b[0].communicate(timeout=30)
        assert b[0].returncode == 0, err
        summary = json.loads(js.read_text())
    finally:
        for proc in b:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    q = summary["queues"][0]
    assert (s["RX-packets"], s["TX-packets"]) == (len(sizes), len(sizes))
    assert (q["rx_frames"], q["tx_frames"]) == (len(sizes), len(sizes))
