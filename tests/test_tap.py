"""``--netdev tap``: the guest's frames through QEMU's tap backend into a real tap in the run's
own network namespace, the host kernel's stack, and real sockets at 10.0.2.2.

Every run is a real ``python -m vreplica.cli run``; ``no_leftovers`` also fails a test that
leaves a namespace (``vnr-<rid>``) behind. Needs root (namespaces, /dev/net/tun).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from replica import run_summary

from common.inet import IPPROTO_UDP, csum_fold, csum_partial, pseudo_header_sum
from common.netns import netns_path, privilege_problem, run_namespaces

pytestmark = [pytest.mark.usefixtures("no_leftovers"),
              pytest.mark.skipif(privilege_problem() is not None,
                                 reason=f"--netdev tap: {privilege_problem()}")]

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60


def run(tmp_path: Path, *args: str) -> dict:
    return run_summary(tmp_path, "--netdev", "tap", *args, "--timeout", str(TIMEOUT_S),
                       timeout=TIMEOUT_S + 30)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [64, 1472])
def test_tap_guest_to_host_socket_exactly(tmp_path: Path, size: int) -> None:
    """Every datagram reaches the socket at 10.0.2.2 in the namespace, once, in order, with
    its payload intact (the host kernel answered the guest's ARP for 10.0.2.2)."""
    n = 2000
    s = run(tmp_path, "--packets", str(n), "--size", str(size))
    assert s["host"] == {"received": n, "unique": n, "bad_payloads": 0, "duplicates": 0,
                         "in_order": True}
    assert s["tap"]["stats"]["written"] >= n  # + the guest's ARP request
    assert s["device_errors"] == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [64, 1472])
def test_tap_host_to_guest_socket_exactly(tmp_path: Path, size: int) -> None:
    """A host sender in the namespace sends to 10.0.2.15: the kernel resolves the guest by
    ARP, the tap hands the frames to QEMU's tap_send, and the guest's socket gets each once."""
    n = 500
    s = run(tmp_path, "--mode", "sink", "--packets", str(n), "--size", str(size))
    assert (s["arrived"], s["unique"], s["duplicates"], s["in_order"]) == (n, n, 0, True)
    assert s["tap"]["stats"]["read"] >= n


@pytest.mark.timeout(90)
def test_tap_echo_and_ping_answered_by_the_host_kernel(tmp_path: Path) -> None:
    """UDP round trips through a real echo socket, ICMP echo answered by the kernel itself."""
    s = run(tmp_path, "--mode", "echo", "--packets", "200", "--window", "8")
    assert (s["replies"], s["bad_replies"], s["duplicate_replies"]) == (200, 0, 0)
    p = run(tmp_path, "--mode", "ping", "--packets", "5")
    assert p["replies"] == 5


def pcap_frames(path: Path) -> list[bytes]:
    data = path.read_bytes()
    frames, off = [], 24
    while off < len(data):
        incl = int.from_bytes(data[off + 8 : off + 12], "little")
        frames.append(data[off + 16 : off + 16 + incl])
        off += 16 + incl
    return frames


def udp_frames(path: Path) -> list[tuple[bytes, bytes, int, bytes]]:
    """(source address, destination address, checksum field, UDP segment) of each frame."""
    out = []
    for f in pcap_frames(path):
        if f[12:14] == b"\x08\x00" and f[23] == IPPROTO_UDP:
            ihl = (f[14] & 0xF) * 4
            seg = f[14 + ihl :]
            length = int.from_bytes(seg[4:6], "big")
            out.append((f[26:30], f[30:34], int.from_bytes(seg[6:8], "big"), seg[:length]))
    return out


def tshark_checksum_status(pcap: Path) -> list[str]:
    """tshark's verdict on each UDP checksum in the capture (Good / Bad)."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-o", "udp.check_checksum:TRUE", "-Y", "udp",
                          "-T", "fields", "-e", "udp.checksum.status"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    names = {"0": "Bad", "1": "Good", "2": "Unverified"}
    return [names.get(x.strip(), x.strip()) for x in out.splitlines()]


@pytest.mark.timeout(120)
def test_tap_checksum_offload_both_ways(tmp_path: Path) -> None:
    """With VIRTIO_NET_F_CSUM/GUEST_CSUM both sides leave the UDP checksum partial: the
    guest puts the pseudo header's sum in it and NEEDS_CSUM in the vnet header; the host
    kernel (TUN_F_CSUM) does the same toward the guest. The pcap shows exactly that partial
    value, the host socket still gets every payload intact, and the guest took the replies
    on the header's word. With the offloads off, tshark finds every checksum complete."""
    n = 100
    pcap = tmp_path / "on.pcap"
    s = run(tmp_path, "--mode", "echo", "--packets", str(n), "--pcap", str(pcap))
    assert s["replies"] == n and s["bad_replies"] == 0
    assert s["tap"]["offload"]["csum"] is True
    assert s["guest_csum"] == {"csum_offloaded": n, "csum_errors": 0}
    frames = udp_frames(pcap)
    assert len(frames) == 2 * n
    for saddr, daddr, check, seg in frames:
        partial = 0xFFFF - csum_fold(pseudo_header_sum(saddr, daddr, IPPROTO_UDP, len(seg)))
        assert check == partial, (saddr, daddr, hex(check), hex(partial))
        # completing it (as the device would) gives a checksum that verifies
        full = csum_fold(csum_partial(seg[:6] + b"\0\0" + seg[8:], partial))
        assert csum_partial(seg[:6] + full.to_bytes(2, "big") + seg[8:],
                            pseudo_header_sum(saddr, daddr, IPPROTO_UDP, len(seg))) == 0
    pcap_off = tmp_path / "off.pcap"
    s = run(tmp_path, "--mode", "echo", "--packets", str(n), "--pcap", str(pcap_off),
            "--csum", "off")
    assert s["replies"] == n and s["guest_csum"] == {"csum_offloaded": 0, "csum_errors": 0}
    assert s["tap"]["offload"]["csum"] is False
    assert shutil.which("tshark") is not None, "tshark is not installed (./run.sh test installs it)"
    assert tshark_checksum_status(pcap_off) == ["Good"] * (2 * n)
    assert set(tshark_checksum_status(pcap)) == {"Bad"}  # partial, as a capture shows offload


@pytest.mark.timeout(120)
def test_tap_backpressure_parks_and_resumes_losing_nothing(tmp_path: Path) -> None:
    """A token-bucket qdisc drains the guest's frames at 2 Mbit/s while they stay charged to
    the tap's 16 KiB send buffer: the tap's writev would block, tap_receive_iov returns 0,
    the frame waits in the net queue and its element in async_tx, and POLLOUT on the tap
    (tap_writable -> qemu_flush_queued_packets -> virtio_net_tx_complete) resumes TX."""
    n = 400
    s = run(tmp_path, "--packets", str(n), "--size", "1472", "--tap-rate", "2mbit",
            "--tap-sndbuf", "16384")
    st = s["tap"]["stats"]
    assert st["write_eagain"] > 0 and s["async_tx_parks"] > 0
    assert st["writable_flushes"] >= 1
    assert s["host"] == {"received": n, "unique": n, "bad_payloads": 0, "duplicates": 0,
                         "in_order": True}


def start_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vreplica.cli", "run", "--netdev", "tap",
                             "--packets", "200000", "--timeout", "60", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_namespace(p: subprocess.Popen, before: set[str]) -> str:
    """The run id of the namespace the run made, once it is there and traffic flows."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = set(run_namespaces()) - before
        procs = psutil.Process(p.pid).children()
        if new and len(procs) == 3:
            time.sleep(0.5)  # let it get going: the kill lands on a run under load
            return new.pop()
        time.sleep(0.02)
    raise AssertionError("the run made no namespace")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", ["supervisor", "qemu", "kvm", "guest"])
@pytest.mark.parametrize("vhost", [[], ["--vhost", "on", "--queues", "2"]],
                         ids=["userspace", "vhost-mq"])
def test_tap_kill9_leaves_no_namespace(victim: str, vhost: list[str]) -> None:
    """kill -9 of the supervisor or any of its processes: the namespace (and the tap in it)
    goes with the run's other objects (no_leftovers checks all of them); with vhost the KVM
    process holds the tap's queues too (VHOST_NET_SET_BACKEND) and lets them go."""
    before = set(run_namespaces())
    p = start_run(*vhost)
    rid = wait_namespace(p, before)
    if victim == "supervisor":
        p.kill()
    else:
        for c in psutil.Process(p.pid).children():
            if f"{victim}proc" in c.cmdline():
                c.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    deadline = time.monotonic() + 5
    while netns_path(f"vnr-{rid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not netns_path(f"vnr-{rid}").exists()


@pytest.mark.timeout(30)
def test_tap_without_privilege_one_line_exit_2() -> None:
    """Without CAP_NET_ADMIN/CAP_SYS_ADMIN the option says so in one line, before any work."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop capabilities")
    drop = "-net_admin,-sys_admin"
    proc = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}",
                           sys.executable, "-m", "vreplica.cli", "run", "--netdev", "tap"],
                          cwd=REPO, capture_output=True, text=True, timeout=20,
                          env={**os.environ})
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(r"vreplica: --netdev tap needs CAP_NET_ADMIN.*\n", proc.stderr)
