"""What a new user sees first: ``vreplica demo`` (``./run.sh`` with no arguments)."""

from __future__ import annotations

import os
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
    ("kvm", "kvm_pio"), ("kvm", "ioeventfd_write"),
    ("qemu", "main_loop_wait"), ("qemu", "virtio_queue_notify"),
    ("qemu", "virtio_net_handle_tx_bh"), ("qemu", "qemu_bh_schedule"), ("qemu", "aio_bh_poll"),
    ("qemu", "virtio_net_tx_bh"), ("qemu", "virtio_net_flush_tx"), ("qemu", "virtqueue_pop"),
    ("qemu", "qemu_sendv_packet_async"), ("qemu", "qemu_net_queue_send_iov"),
    ("qemu", "nc_sendv_compat"), ("qemu", "net_slirp_receive"), ("qemu", "slirp_input"),
    ("qemu", "sosendto"), ("qemu", "virtqueue_fill"), ("qemu", "virtqueue_flush"),
    ("qemu", "virtio_notify"), ("qemu", "kvm_vm_ioctl"), ("kvm", "kvm_msi_set_irq"),
    ("kvm", "kvm_inj_virq"),
    ("guest", "vring_interrupt"), ("guest", "skb_xmit_done"), ("guest", "virtnet_poll_tx"),
    ("guest", "free_old_xmit_skbs"),
]
RECEIVE_PATH = [
    ("qemu", "slirp_pollfds_poll"), ("qemu", "sorecvfrom"), ("qemu", "udp_output"),
    ("qemu", "ip_output"), ("qemu", "if_encap"), ("qemu", "slirp_output"),
    ("qemu", "qemu_send_packet"), ("qemu", "qemu_net_queue_send_iov"),
    ("qemu", "nc_sendv_compat"), ("qemu", "virtio_net_receive"), ("qemu", "virtqueue_pop"),
    ("qemu", "virtqueue_fill"), ("qemu", "virtqueue_flush"), ("qemu", "virtio_notify"),
    ("qemu", "kvm_vm_ioctl"), ("kvm", "kvm_msi_set_irq"), ("kvm", "kvm_inj_virq"),
    ("guest", "vring_interrupt"),
    ("guest", "skb_recv_done"), ("guest", "net_rx_action"), ("guest", "virtnet_poll"),
    ("guest", "virtnet_receive"), ("guest", "virtqueue_get_buf"), ("guest", "receive_buf"),
    ("guest", "netif_receive_skb"), ("guest", "udp_rcv"), ("guest", "recvfrom"),
]
TO_HOST, BACK = "-> to the host", "<- back to the guest"
WHERE_W = 16
CALL = re.compile(r"^(?P<indent> *)(?P<name>[a-z_0-9]+)(?:  (?P<detail>.*))?$")

Line = tuple[str, str, float | None, int, bool, str]


def chain_line(line: str) -> Line | None:
    """(process, function, offset or None if already running, depth, crosses a process,
    detail) of one call-chain line:
    ``{offset:>8} {>> or blanks} {process thread:<16} {indent}{name}  {detail}``."""
    when, mark, where, call = line[:8].strip(), line[9:11], line[12:12 + WHERE_W], \
        line[13 + WHERE_W:]
    proc = where.split(" ")[0]
    m = CALL.match(call)
    if proc not in ("guest", "kvm", "qemu") or not m or not re.fullmatch(r"[\d.]+|\.\.\.",
                                                                          when):
        return None
    return (proc, m["name"], None if when == "..." else float(when), len(m["indent"]) // 2,
            mark == ">>", m["detail"] or "")


def unwrapped(lines: list[str]) -> list[str]:
    """The call chain's lines with each one's wrapped detail joined back (a line that goes on
    below is indented past the offset column and starts with no marker)."""
    out: list[str] = []
    for line in lines:
        if out and line.startswith(" " * (13 + WHERE_W)) and chain_line(out[-1]):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return out


def demo(*args: str, cwd: Path = REPO, columns: int | None = None
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "demo", *args],
                          capture_output=True, text=True, timeout=50, cwd=cwd, env=env)


def follows(chain: list[Line], path: list[tuple[str, str]], out: str) -> None:
    seen = [(proc_, name) for proc_, name, *_ in chain]
    at = 0
    for step in path:
        assert step in seen[at:], f"{step} missing or out of order in:\n{out}"
        at = seen.index(step, at) + 1


@pytest.mark.timeout(60)
def test_demo_follows_one_round_trip_through_the_three_processes(tmp_path: Path) -> None:
    out = tmp_path / "tmp"
    proc = demo("--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    lines = text.splitlines()
    assert len(lines) <= 100, text  # about one screen
    assert max(len(line) for line in lines if str(out) not in line) <= 100, text
    lines = unwrapped(lines)
    seq = int(re.search(r"One round trip \(seq (\d+)\)", lines[0])[1])
    assert re.search(rf"followed: seq {seq}: the median round trip \(\d+ us\) of seqs "
                     r"[\d, ]+", text)
    assert any(line.startswith("legend:") for line in lines[:5])
    there = next(i for i, line in enumerate(lines) if line.startswith(TO_HOST))
    back = next(i for i, line in enumerate(lines) if line.startswith(BACK))
    end = next(i for i, line in enumerate(lines) if line.startswith("round trip:"))
    assert there < back < end
    tx = [c for c in map(chain_line, lines[there + 1:back]) if c]
    rx = [c for c in map(chain_line, lines[back + 1:end]) if c]
    assert len(tx) == back - there - 1 and len(rx) == end - back - 1, text

    follows(tx, TRANSMIT_PATH, text)
    follows(rx, RECEIVE_PATH, text)
    assert not {n for _, n, *_ in tx} & {"sorecvfrom", "skb_recv_done", "receive_buf", "recvfrom"}
    assert not {n for _, n, *_ in rx} & {"sosendto", "skb_xmit_done", "free_old_xmit_skbs"}
    for section in (tx, rx):
        offsets = [when for _, _, when, *_ in section if when is not None]
        assert offsets == sorted(offsets), text
    assert tx[0][:3] == ("guest", "udp_sendmsg", 0.0) and f"seq {seq}:" in tx[0][5]
    assert rx[0][0] == "qemu" and rx[-1][:2] == ("guest", "recvfrom")
    assert f"seq {seq}: 64 B returned to the program" in rx[-1][5]
    sorecv = next(c for c in rx if c[1] == "sorecvfrom")
    assert f"seq {seq}:" in sorecv[5]
    assert [p for p, *_, cross, _ in tx if cross][:4] == ["kvm", "qemu", "kvm", "guest"]
    assert [p for p, *_, cross, _ in rx if cross][:2] == ["kvm", "guest"]
    depth = {name: d for _, name, _, d, _, _ in tx}
    assert depth["start_xmit"] > depth["udp_sendmsg"]
    assert depth["sosendto"] > depth["slirp_input"] > depth["net_slirp_receive"]
    depth = {name: d for _, name, _, d, _, _ in rx}
    assert depth["sorecvfrom"] > depth["slirp_pollfds_poll"]
    assert depth["virtqueue_pop"] > depth["virtio_net_receive"] > depth["nc_sendv_compat"] \
        > depth["slirp_output"] > depth["if_encap"] > depth["udp_output"]
    assert depth["udp_rcv"] > depth["netif_receive_skb"] > depth["receive_buf"] \
        > depth["virtnet_receive"] > depth["virtnet_poll"] > depth["net_rx_action"]
    rtt = float(re.match(r"round trip: (\d+) us, udp_sendmsg to recvfrom", lines[end])[1])
    assert rtt >= rx[-1][2] - 1

    assert re.search(r"got 5 of 5 replies, payloads intact", text)
    assert re.search(r"delivered\s+5", text)
    assert "ui.perfetto.dev" in text and "Open trace file" in text
    picture = out / "round-trip.svg"
    assert (out / "trace.json").stat().st_size > 0
    assert (out / "echo.pcap").read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"
    assert f"files in {out}/ (each demo run replaces them):" in " ".join(text.split())
    for name in ("trace.json", "echo.pcap", picture.name):
        assert f"  {name} " in text
    drawn = " ".join(ET.parse(picture).getroot().itertext())
    for name in ("sosendto", "sorecvfrom", "virtio_net_receive", "skb_recv_done", "recvfrom"):
        assert name in drawn, name


@pytest.mark.timeout(60)
def test_demo_without_arguments_writes_to_out(tmp_path: Path) -> None:
    proc = demo(cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "trace.json").exists()
    assert "files in out/ (each demo run replaces them):" in proc.stdout


@pytest.mark.timeout(30)
def test_demo_bad_option_is_one_line_and_status_2(tmp_path: Path) -> None:
    for args in (["--packets", "0"], ["--bogus"], ["--packets", "x"], ["--packet", "5"]):
        proc = demo(*args, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def tx_section(lines: list[str]) -> list[Line]:
    there = next(i for i, line in enumerate(lines) if line.startswith(TO_HOST))
    end = next((i for i, line in enumerate(lines[there + 1:], there + 1)
                if not chain_line(line)), len(lines))
    return [c for c in map(chain_line, lines[there + 1:end]) if c]


KICK_THROUGH_QEMU = ["kvm_cpu_exec", "kvm_handle_io", "address_space_rw",
                     "virtio_pci_config_write", "virtio_ioport_write", "virtio_queue_notify",
                     "virtio_net_handle_tx_bh"]
"""QEMU 7.2's calls for a guest's OUT to the legacy virtio-pci notify port without ioeventfd:
the vCPU thread's KVM_EXIT_IO, down to virtio-net's TX handler, each inside the last."""


@pytest.mark.timeout(60)
def test_demo_ioeventfd_off_shows_the_kick_through_qemus_vcpu_thread(tmp_path: Path) -> None:
    proc = demo("--ioeventfd", "off", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tx = tx_section(unwrapped(proc.stdout.splitlines()))
    names = [name for _, name, *_ in tx]
    assert "ioeventfd_write" not in names, proc.stdout
    at = names.index("vp_notify")
    steps = []
    for name in KICK_THROUGH_QEMU:
        assert name in names[at:], f"{name} missing or out of order in:\n{proc.stdout}"
        at = names.index(name, at)
        steps.append(tx[at])
    assert {(proc_, when is None or when > 0) for proc_, _, when, *_ in steps} == {("qemu", True)}
    depths = [depth for _, _, _, depth, _, _ in steps]
    assert depths == sorted(set(depths)), proc.stdout  # each called by the one before
    pio = next(c for c in tx if c[1] == "kvm_pio")
    uexit = next(c for c in tx if c[1] == "kvm_userspace_exit")
    assert "KVM_EXIT_IO" in uexit[5] and pio[2] <= uexit[2]
    assert KICK_HINT_START not in proc.stdout


KICK_HINT_START = "the kick went by KVM's ioeventfd; ./run.sh demo --ioeventfd off"


@pytest.mark.timeout(60)
def test_default_demo_says_how_to_see_the_kick_through_qemu(tmp_path: Path) -> None:
    proc = demo("--packets", "3", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hint = [line for line in unwrapped(proc.stdout.splitlines())
            if line.startswith(KICK_HINT_START)]
    assert len(hint) == 1 and "kvm_cpu_exec" in hint[0], proc.stdout
    names = [name for _, name, *_ in tx_section(unwrapped(proc.stdout.splitlines()))]
    assert "ioeventfd_write" in names and "kvm_handle_io" not in names, proc.stdout


@pytest.mark.timeout(60)
def test_demo_passes_the_device_properties_to_the_run(tmp_path: Path) -> None:
    proc = demo("--tx", "timer", "--vectors", "0", "--event-idx", "off", "--mrg-rxbuf", "on",
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = unwrapped(proc.stdout.splitlines())
    names = [name for _, name, *_ in tx_section(lines)]
    assert "virtio_net_handle_tx_timer" in names and "virtio_net_tx_timer" in names
    assert "virtio_net_tx_bh" not in names and "kvm_set_irq" in names, proc.stdout
    assert "kvm_msi_set_irq" not in names
    assert re.search(r"event_idx off, interrupts intx", proc.stdout)
    reclaim = [c for c in map(chain_line, lines) if c and c[1] == "virtqueue_get_buf"
               and "input." in c[5]]
    frame = [c for c in map(chain_line, lines) if c and c[1] == "receive_buf"]
    # mergeable RX buffers: the device writes the 12-byte virtio_net_hdr_mrg_rxbuf before the frame
    got = int(re.search(r"len (\d+)", reclaim[0][5])[1])
    assert got == int(re.match(r"(\d+)-byte frame", frame[0][5])[1]) + 12, proc.stdout


@pytest.mark.timeout(30)
def test_demo_device_options_are_checked_as_the_run_checks_them(tmp_path: Path) -> None:
    for args, says in ((["--ioeventfd", "maybe"], "on or off"),
                       (["--vectors", "99"], "--vectors must be between 0 and 64"),
                       (["--queue-size", "100"], "--queue-size must be a power of 2")):
        proc = demo(*args, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and says in proc.stderr and proc.stdout == ""
        assert not (tmp_path / "o").exists()


def trace_show(*args: str, columns: int = 100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "trace", "show", *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO,
                          env=dict(os.environ, COLUMNS=str(columns)))


@pytest.mark.timeout(90)
def test_trace_show_prints_a_packets_chain_from_the_demos_trace(tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = demo("--packets", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trace = str(out / "trace.json")
    for seq in (1, 3):
        shown = trace_show(trace, "--packet", str(seq))
        assert shown.returncode == 0, shown.stdout + shown.stderr
        lines = unwrapped(shown.stdout.splitlines())
        assert lines[0].startswith(f"One round trip (seq {seq})")
        tx = tx_section(lines)
        follows(tx, TRANSMIT_PATH, shown.stdout)
        assert tx[0][1] == "udp_sendmsg" and f"seq {seq}:" in tx[0][5]
        recv = [c for c in map(chain_line, lines) if c and c[1] == "recvfrom"]
        assert len(recv) == 1 and f"seq {seq}: 64 B returned" in recv[0][5], shown.stdout
    default = trace_show(trace)
    demo_seq = re.search(r"One round trip \(seq (\d+)\)", proc.stdout)[1]
    assert default.returncode == 0 and f"(seq {demo_seq})" in default.stdout.splitlines()[0]

    missing = trace_show(trace, "--packet", "7")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "seq 7" in missing.stderr
    not_trace = tmp_path / "x.json"
    not_trace.write_text('{"a": 1}')
    for args in ([str(tmp_path / "none.json")], [str(not_trace)], [], [trace, "--packet", "x"]):
        bad = trace_show(*args)
        assert bad.returncode == 2 and bad.stdout == "", bad.stderr
        assert bad.stderr.count("\n") == 1, bad.stderr
    assert trace_show("--help").returncode == 0

    # the terminal's width: lines wrap at spaces, never through a number or a name
    narrow, wide = trace_show(trace, columns=60), trace_show(trace, columns=250)
    assert narrow.returncode == 0 and wide.returncode == 0
    assert narrow.stdout.split() == wide.stdout.split()
    assert len(narrow.stdout.splitlines()) > len(wide.stdout.splitlines())
    for line in narrow.stdout.splitlines():
        assert len(line) <= 60 or " " not in line.strip(), line
    elems = re.findall(r"elem (0x[0-9a-f]+)", wide.stdout)
    assert elems and elems == re.findall(r"elem\s+(0x[0-9a-f]+)", narrow.stdout)


KICK_THROUGH_QEMU_MMIO = ["kvm_cpu_exec", "address_space_rw", "virtio_pci_notify_write",
                          "virtio_queue_notify", "virtio_net_handle_tx_bh"]
"""The same kick on the modern transport: a store to the queue's notify address, which
kvm_cpu_exec's KVM_EXIT_MMIO case hands to address_space_rw on the memory address space."""


@pytest.mark.timeout(60)
def test_demo_modern_kick_is_an_mmio_exit_through_qemus_vcpu_thread(tmp_path: Path) -> None:
    proc = demo("--transport", "modern", "--ioeventfd", "off", "--packets", "3",
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tx = tx_section(unwrapped(proc.stdout.splitlines()))
    names = [name for _, name, *_ in tx]
    assert "kvm_pio" not in names and "ioeventfd_write" not in names, proc.stdout
    at = names.index("vp_notify")
    assert "an MMIO store" in tx[at][5], proc.stdout
    for name in ["kvm_exit", "kvm_mmio", "kvm_userspace_exit", *KICK_THROUGH_QEMU_MMIO]:
        assert name in names[at:], f"{name} missing or out of order in:\n{proc.stdout}"
        at = names.index(name, at)
    uexit = next(c for c in tx if c[1] == "kvm_userspace_exit")
    assert "KVM_EXIT_MMIO" in uexit[5]
