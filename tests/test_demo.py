"""What a new user sees first: ``vreplica demo`` (``./run.sh`` with no arguments)."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
TRANSMIT_PATH = [
    ("guest", "udp_sendmsg"), ("guest", "start_xmit"), ("guest", "virtqueue_add_split"),
    ("guest", "vp_notify"), ("kvm", "kvm_arch_vcpu_ioctl_run"), ("kvm", "kvm_exit"),
    ("kvm", "handle_exit"), ("kvm", "kvm_pio"), ("kvm", "ioeventfd_write"),
    ("qemu", "main_loop_wait"), ("qemu", "virtio_queue_notify"),
    ("qemu", "virtio_net_handle_tx_bh"), ("qemu", "qemu_bh_schedule"), ("qemu", "aio_bh_poll"),
    ("qemu", "virtio_net_tx_bh"), ("qemu", "virtio_net_flush_tx"), ("qemu", "virtqueue_pop"),
    ("qemu", "qemu_sendv_packet_async"), ("qemu", "qemu_net_queue_send_iov"),
    ("qemu", "nc_sendv_compat"), ("qemu", "net_slirp_receive"), ("qemu", "slirp_input"),
    ("qemu", "sosendto"), ("qemu", "virtqueue_fill"), ("qemu", "virtqueue_flush"),
    ("qemu", "virtio_notify"), ("kvm", "irqfd_wakeup"), ("kvm", "kvm_inj_virq"),
    ("guest", "vring_interrupt"), ("guest", "skb_xmit_done"), ("guest", "virtnet_poll_tx"),
    ("guest", "free_old_xmit_skbs"),
]
WHERE_W = 16
CALL = re.compile(r"^(?P<indent> *)(?P<name>[a-z_0-9]+)(?:  .*)?$")


def chain_line(line: str) -> tuple[str, str, float | None, int, bool] | None:
    """(process, function, offset or None if already running, depth, crosses a process) of
    one call-chain line: ``{offset:>8} {>> or blanks} {process thread:<16} {indent}{name}``."""
    when, mark, where, call = line[:8].strip(), line[9:11], line[12:12 + WHERE_W], \
        line[13 + WHERE_W:]
    proc = where.split(" ")[0]
    m = CALL.match(call)
    if proc not in ("guest", "kvm", "qemu") or not m or not re.fullmatch(r"[\d.]+|\.\.\.",
                                                                          when):
        return None
    return (proc, m["name"], None if when == "..." else float(when), len(m["indent"]) // 2,
            mark == ">>")


def demo(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "demo", *args],
                          capture_output=True, text=True, timeout=90, cwd=cwd)


@pytest.mark.timeout(120)
def test_demo_follows_one_datagram_through_the_three_processes(tmp_path: Path) -> None:
    out = tmp_path / "tmp"
    proc = demo("--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) <= 60, proc.stdout
    assert max(len(line) for line in lines if str(out) not in line) <= 100, proc.stdout
    assert lines[1].startswith("legend:")

    chain = [c for c in map(chain_line, lines) if c]
    seen = [(proc_, name) for proc_, name, _, _, _ in chain]
    at = 0
    for step in TRANSMIT_PATH:
        assert step in seen[at:], f"{step} missing or out of order in:\n{proc.stdout}"
        at = seen.index(step, at) + 1
    offsets = [when for _, _, when, _, _ in chain if when is not None]
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    depth = {name: d for _, name, _, d, _ in chain}
    assert depth["start_xmit"] > depth["udp_sendmsg"]
    assert depth["sosendto"] > depth["slirp_input"] > depth["net_slirp_receive"]
    crossings = [(proc_, name) for proc_, name, _, _, cross in chain if cross]
    assert [p for p, _ in crossings][:4] == ["kvm", "qemu", "kvm", "guest"], crossings

    assert re.search(r"got 5 of 5 datagrams, payloads intact", proc.stdout)
    assert re.search(r"delivered\s+5", proc.stdout)
    assert "ui.perfetto.dev" in proc.stdout and "Open trace file" in proc.stdout
    picture = next(out.glob("packet-*.svg"))
    assert (out / "trace.json").stat().st_size > 0
    assert (out / "tx.pcap").read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"
    assert f"files in {out}/:" in proc.stdout
    for name in ("trace.json", "tx.pcap", picture.name):
        assert f"  {name} " in proc.stdout
    assert "sosendto" in " ".join(ET.parse(picture).getroot().itertext())


@pytest.mark.timeout(120)
def test_demo_without_arguments_writes_to_out(tmp_path: Path) -> None:
    proc = demo(cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "trace.json").exists()
    assert "files in out/:" in proc.stdout


@pytest.mark.timeout(30)
def test_demo_bad_option_is_one_line_and_status_2(tmp_path: Path) -> None:
    for args in (["--packets", "0"], ["--bogus"], ["--packets", "x"], ["--packet", "5"]):
        proc = demo(*args, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stdout == ""
