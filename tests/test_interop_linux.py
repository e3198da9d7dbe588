"""Interop: the replica's vhost-user backend under a real Linux driver.

QEMU 7.2 (TCG) boots Debian's Linux 6.1 with an initramfs built here (busybox-static,
virtio-net's modules, the project's udpsend) and connects its virtio-net-pci to the
replica's `vhost-user-bridge --netdev user` over vhost-user. The guest pings 10.0.2.2
(answered by the replica's slirp) and sends datagrams that arrive at a socket on 127.0.0.1;
its console reports its counts, which must equal what the socket got and what the backend
says it moved each way. Once per transport, ring and RX-buffer configuration.

A control boot against dpdk-testpmd's vhost library (icmpecho) holds the QEMU/Linux side
to a backend that is not the replica's.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testpmd import DpdkTestpmd

from vreplica.interop.cache import find_kernel
from vreplica.interop.initramfs import build_initramfs
from vreplica.interop.linux_vm import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    GuestReport,
    NicConfig,
    parse_console,
    qemu_command,
)

REPO = Path(__file__).resolve().parent.parent
PINGS = 10
DATAGRAMS = 400
DATAGRAM_SIZE = 200
BOOT_TIMEOUT_S = 240.0
BACKEND_START_S = 30.0

# Each transport, ring layout and RX-buffer mode at least once (packed needs modern).
CONFIGS = [
    NicConfig("legacy", packed=False, mrg_rxbuf=True),
    NicConfig("modern", packed=False, mrg_rxbuf=False),
    NicConfig("modern", packed=True, mrg_rxbuf=True),
    NicConfig("modern", packed=True, mrg_rxbuf=False),
]

pytestmark = pytest.mark.timeout(BOOT_TIMEOUT_S + 120)


@pytest.fixture(scope="module")
def guest_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(vmlinux, initramfs): the cached kernel and a fresh initramfs for this module."""
    kernel = find_kernel()
    initrd = build_initramfs(tmp_path_factory.mktemp("linux") / "initramfs.cpio", kernel)
    return kernel.vmlinux(), initrd


class EchoingCollector:
    """A UDP socket on 127.0.0.1 keeping every datagram, and echoing udpsend's barrier
    (sequence number 0xffffffff) back to its sender."""

    BARRIER = 0xFFFFFFFF

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []
        self.barriers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-echo-barrier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) >= 4 and struct.unpack_from(">I", data)[0] == self.BARRIER:
                self.barriers += 1
                self.sock.sendto(data[:4], peer)
            else:
                self.datagrams.append(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[EchoingCollector]:
    c = EchoingCollector()
    try:
        yield c
    finally:
        c.close()


PR_SET_PDEATHSIG = 1


def own_session_dying_with_us() -> None:
    """preexec_fn: a session (and process group) of its own, and SIGKILL when the test dies."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a peer's process group and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Boot:
    report: GuestReport
    console: str
    returncode: int
    seconds: float


def boot(images: tuple[Path, Path], sock: Path, nic: NicConfig, workdir: Path,
         guest_env: dict[str, str]) -> Boot:
    """QEMU with the Linux guest to its power-off; killed in any case."""
    console = workdir / f"console-{nic.name}.log"
    errlog = workdir / f"qemu-{nic.name}.err"
    cmd = qemu_command(images[0], images[1], sock, nic, console, guest_env)
    start = time.monotonic()
    with open(errlog, "wb") as err:
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=own_session_dying_with_us)
    try:
        rc = qemu.wait(timeout=BOOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = -1
    finally:
        kill_group(qemu)
    seconds = time.monotonic() - start
    text = console.read_text(errors="replace") if console.exists() else ""
    assert rc == 0, (f"QEMU ended with {rc} after {seconds:.0f} s; stderr: "
                     f"{errlog.read_text(errors='replace')[-2000:]}\nconsole:\n{text[-3000:]}")
    return Boot(parse_console(text), text, rc, seconds)


@contextlib.contextmanager
def replica_backend(sock: Path, summary: Path, workdir: Path) -> Iterator[subprocess.Popen]:
    """`./run.sh vhost-user-bridge --server --netdev user` until its first line says it
    listens."""
    log = open(workdir / "backend.err", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vreplica.cli", "vhost-user-bridge", "--socket", str(sock),
         "--server", "--netdev", "user", "--summary-json", str(summary)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
        preexec_fn=own_session_dying_with_us)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], BACKEND_START_S)
        line = proc.stdout.readline().decode(errors="replace") if ready else ""
        assert sock.exists(), f"the backend did not listen on {sock}: {line!r}"
        yield proc
    finally:
        kill_group(proc)
        log.close()


def stop_backend(proc: subprocess.Popen, summary: Path) -> dict:
    """SIGTERM, as a user's Ctrl-C; the backend exits 0 and writes its summary."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    return json.loads(summary.read_text())


def check_features(report: GuestReport, nic: NicConfig) -> None:
    assert report.features is not None, "the guest found no virtio-net device"
    assert report.has(VIRTIO_F_VERSION_1) == (nic.transport == "modern")
    assert report.has(VIRTIO_F_RING_PACKED) == nic.packed
    assert report.has(VIRTIO_NET_F_MRG_RXBUF) == nic.mrg_rxbuf


def check_datagrams(datagrams: list[bytes]) -> None:
    """Every sequence number once, each datagram whole."""
    pattern = bytes(i & 0xFF for i in range(DATAGRAM_SIZE))[4:]
    seqs = sorted(struct.unpack_from(">I", d)[0] for d in datagrams)
    assert seqs == list(range(DATAGRAMS)), (
        f"{len(datagrams)} datagrams; missing {sorted(set(range(DATAGRAMS)) - set(seqs))[:20]}")
    assert all(len(d) == DATAGRAM_SIZE and d[4:] == pattern for d in datagrams)


@pytest.mark.parametrize("nic", CONFIGS, ids=[c.name for c in CONFIGS])
def test_linux_guest_through_replica_backend(
        nic: NicConfig, guest_images: tuple[Path, Path], tmp_path: Path,
        udp_echo: EchoingCollector, no_leftovers: object) -> None:
    sock = tmp_path / "vhost-user.sock"
    summary_path = tmp_path / "backend.json"
    env = {"vnr_ping": str(PINGS), "vnr_udp_port": str(udp_echo.port),
           "vnr_udp_count": str(DATAGRAMS), "vnr_udp_size": str(DATAGRAM_SIZE)}
    with replica_backend(sock, summary_path, tmp_path) as backend:
        run = boot(guest_images, sock, nic, tmp_path, env)
        summary = stop_backend(backend, summary_path)
    assert not sock.exists(), "the backend left its socket behind"
    r = run.report
    print(f"{nic.name}: boot {run.seconds:.1f} s, guest tx {r.stats.get('tx_packets')} "
          f"rx {r.stats.get('rx_packets')}, backend {summary['queues']}")
    assert r.done and not r.failures, run.console[-3000:]
    check_features(r, nic)
    assert r.ping == (PINGS, PINGS)
    assert r.ping1472 == (PINGS, PINGS)
    assert r.udp_sent == DATAGRAMS and r.udp_echoed
    assert udp_echo.barriers == 1
    check_datagrams(list(udp_echo.datagrams))
    assert summary["panics"] == []
    (q,) = summary["queues"]
    assert q["tx_frames"] == r.stats["tx_packets"]
    assert q["rx_frames"] == r.stats["rx_packets"]
    # at least every echo request, datagram and the barrier out; every reply and its echo in
    assert r.stats["tx_packets"] >= 2 * PINGS + DATAGRAMS + 1
    assert r.stats["rx_packets"] >= 2 * PINGS + 1
    assert r.stats["rx_errors"] == r.stats["tx_errors"] == 0
    assert r.stats["rx_dropped"] == r.stats["tx_dropped"] == 0


def test_linux_guest_through_testpmd(guest_images: tuple[Path, Path], tmp_path: Path,
                                     no_leftovers: object) -> None:
    """The control: the same QEMU line and guest against DPDK's vhost library (icmpecho)."""
    nic = NicConfig("modern", packed=False, mrg_rxbuf=True)
    sock = tmp_path / "testpmd.sock"
    testpmd = DpdkTestpmd(sock, mode="icmpecho")
    try:
        testpmd.start()
        run = boot(guest_images, sock, nic, tmp_path, {"vnr_ping": str(PINGS)})
        stats = testpmd.port_stats()
    finally:
        testpmd.stop()
        sock.unlink(missing_ok=True)
    r = run.report
    print(f"testpmd {nic.name}: boot {run.seconds:.1f} s, guest tx {r.stats.get('tx_packets')} "
          f"rx {r.stats.get('rx_packets')}, testpmd {stats}")
    assert r.done and not r.failures, run.console[-3000:]
    check_features(r, nic)
    assert r.ping == (PINGS, PINGS)
    assert r.ping1472 == (PINGS, PINGS)
    assert r.barrier == (1, 1)
    assert (stats["rx"], stats["tx"]) == (r.stats["tx_packets"], r.stats["rx_packets"])
