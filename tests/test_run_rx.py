"""The receive path end to end: host socket -> slirp -> virtio_net_receive -> irqfd ->
vring_interrupt -> the guest's socket, in the real three processes."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from replica import run_summary
from test_run_tx import run_cli_inline

from common.inet import UDP_MAX_PAYLOAD
from common.virtio_abi import VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_MRG_RXBUF
from guestproc.virtio_net import MERGEABLE_BUF_LEN
from vreplica.run.summary import format_summary

pytestmark = pytest.mark.usefixtures("no_leftovers")


def run(tmp_path: Path, *args: str, timeout: float = 90) -> dict:
    return run_summary(tmp_path, *args, timeout=timeout)


def elapsed_line(s: dict) -> str:
    """The summary's "elapsed" line, as the user reads it."""
    return next(line for line in format_summary(s).splitlines() if "elapsed" in line)


def pcap_frames(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, 0)[0] == 0xA1B2C3D4
    assert struct.unpack_from("<I", data, 20)[0] == 1  # LINKTYPE_ETHERNET
    frames, off = [], 24
    while off < len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, off)
        frames.append(data[off + 16 : off + 16 + incl])
        off += 16 + incl
    return frames


@pytest.mark.timeout(120)
@pytest.mark.parametrize("vectors", ["3", "1", "0"], ids=["msix-per-vq", "msix-shared", "intx"])
def test_udp_echo_every_reply_arrives(tmp_path: Path, vectors: str) -> None:
    """Each datagram comes back from the host's echo service to the guest program, exactly."""
    s = run(tmp_path, "--mode", "echo", "--packets", "150", "--size", "200", "--window", "4",
            "--vectors", vectors, "--timeout", "40")
    assert s["replies"] == 150
    assert s["bad_replies"] == 0 and s["duplicate_replies"] == 0
    assert s["interrupt_mode"] == {"3": "msix-per-vq", "1": "msix-shared", "0": "intx"}[vectors]
    assert s["rtt_us_p50"] > 0 and s["rtt_us_p99"] >= s["rtt_us_p50"]
    if vectors == "0":  # a line interrupt: the handler must read ISR, a trapping port read
        assert s["userspace_exits"]["KVM_EXIT_IO"] > 100
        assert s["guest_irqs"].get("virtio0", 0) > 0
    # QEMU raised them itself: KVM_IRQ_LINE_STATUS through the IOAPIC, or KVM_SIGNAL_MSI
    exits = s["exits"]
    assert exits["irqfd_signals"] == 0
    lines, msis = (exits["irq_lines"], exits["signal_msis"])
    assert (lines > 0 and msis == 0) if vectors == "0" else (msis > 0 and lines == 0)
    assert exits["msr_exits"] >= s["interrupts_injected"] > 0  # an x2APIC EOI for each


@pytest.mark.timeout(60)
def test_ping_gateway_gets_replies(tmp_path: Path) -> None:
    s = run(tmp_path, "--mode", "ping", "--packets", "3", "--timeout", "20")
    assert s["replies"] == 3
    assert s["slirp"]["icmp_echo"] == 3
    # each reply woke the waiting program with an RX interrupt, raised and handled
    assert s["rx_interrupts"] >= 3 and s["guest_irqs"]["virtio0-input.0"] >= 3
    elapsed = elapsed_line(s)  # the time the pings took, no rate of a one-at-a-time program
    took_ms = float(re.search(r"([0-9.]+) ms pinging, one echo request at a time$",
                              elapsed).group(1))  # type: ignore[union-attr]
    assert took_ms > 0 and "packets/s" not in elapsed


@pytest.mark.timeout(60)
def test_hostfwd_datagrams_reach_guest(tmp_path: Path) -> None:
    s = run(tmp_path, "--mode", "sink", "--hostfwd", "udp::0-:6000", "--packets", "400",
            "--timeout", "30")
    assert s["arrived"] == 400
    assert s["unique"] == 400 and s["duplicates"] == 0 and s["in_order"]
    m = re.search(r"([0-9.]+) ms from the first datagram received to the last, ([0-9,]+) "
                  r"packets/s$", elapsed_line(s))
    assert m, elapsed_line(s)
    took_ms, rate = float(m.group(1)), int(m.group(2).replace(",", ""))
    # the gaps between 400 arrivals over that time (the time shown rounded to 10 us)
    assert took_ms > 0 and abs(rate - 399 / took_ms * 1e3) <= 0.01 * rate, (took_ms, rate)


@pytest.mark.timeout(60)
def test_pcap_has_arp_before_first_udp_frame(tmp_path: Path) -> None:
    """As in real QEMU's capture: the guest's ARP request, slirp's reply, then the UDP frame."""
    pcap = tmp_path / "dump.pcap"
    s = run(tmp_path, "--packets", "3", "--pcap", str(pcap))
    assert s["delivered"] == 3
    frames = pcap_frames(pcap)
    ethertypes = [int.from_bytes(f[12:14], "big") for f in frames]
    first_udp = ethertypes.index(0x0800)
    arp = [f for f in frames[:first_udp] if int.from_bytes(f[12:14], "big") == 0x0806]
    ops = [int.from_bytes(f[20:22], "big") for f in arp]
    assert ops == [1, 2]
    assert arp[0][0:6] == b"\xff" * 6 and arp[0][38:42] == bytes([10, 0, 2, 2])
    assert arp[1][6:12] == bytes.fromhex("52550a000202")
    assert len(frames[first_udp]) == 14 + 20 + 8 + 64


@pytest.mark.timeout(60)
def test_stalled_refill_queues_then_drops_then_resumes(tmp_path: Path) -> None:
    """No RX buffers: frames wait in the bounded net queue, the rest are dropped and counted;
    when the guest refills, delivery resumes."""
    s = run(tmp_path, "--mode", "sink", "--hostfwd", "udp::0-:6001", "--packets", "1500",
            "--rx-stall-after", "100", "--rx-stall-ms", "400", "--net-queue-len", "64",
            "--timeout", "6")
    assert s["rx_no_buffer"] > 0
    assert s["rx_queued"] >= 64
    assert s["rx_dropped"] > 0
    assert s["arrived"] > 100 + 256  # the ring's worth and the queue came after the stall
    assert s["arrived"] + s["rx_dropped"] <= 1500
    assert s["device_errors"] == []


@pytest.mark.timeout(60)
def test_rx_interrupts_suppressed_in_a_burst(tmp_path: Path) -> None:
    """NAPI keeps RX interrupts off while it polls: far fewer interrupts than packets."""
    s = run(tmp_path, "--mode", "sink", "--hostfwd", "udp::0-:6002", "--packets", "1000",
            "--timeout", "30")
    assert s["arrived"] == 1000
    assert s["rx_interrupts"] < 1000


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mrg_rxbuf", ["on", "off"])
def test_mergeable_rx_buffers_carry_large_frames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mrg_rxbuf: str) -> None:
    """--mrg-rxbuf on: VIRTIO_NET_F_MRG_RXBUF is negotiated on both sides, and every
    full-size echo reply (a 1514-byte frame behind a 12-byte header) comes in as many
    buffers as it needs, the guest reading num_buffers > 1 from its header; off: not
    negotiated, every frame in one buffer. The replies are intact either way."""
    n = 100
    run = run_cli_inline(["--mode", "echo", "--packets", str(n), "--size", str(UDP_MAX_PAYLOAD),
                          "--mrg-rxbuf", mrg_rxbuf, "--window", "8"], tmp_path, monkeypatch)
    s, guest, qemu = run.summary, run.reports["guest"], run.reports["qemu"]
    assert s["replies"] == n and s["bad_replies"] == 0
    negotiated = bool(guest["features"] & (1 << VIRTIO_NET_F_MRG_RXBUF))
    assert negotiated is (mrg_rxbuf == "on")
    assert qemu["virtio_net"]["mergeable_rx_bufs"] is negotiated
    [rq] = guest["rq"]
    if negotiated:
        frame = VIRTIO_NET_HDR_MRG_RXBUF.size + 14 + 20 + 8 + UDP_MAX_PAYLOAD
        per_frame = -(-frame // MERGEABLE_BUF_LEN)
        assert per_frame > 1
        assert rq["merged_frames"] == n
        assert rq["merged_buffers"] == n * per_frame
    else:
        assert rq["merged_frames"] == rq["merged_buffers"] == 0


@pytest.mark.timeout(60)
def test_idle_flows_expire(tmp_path: Path) -> None:
    # slirp's slow timer (499 ms) wakes the main loop between the datagrams, 800 ms apart
    s = run(tmp_path, "--mode", "echo", "--packets", "3", "--pace-ms", "800", "--udp-expire",
            "0.2", "--timeout", "20")
    assert s["replies"] == 3
    assert s["slirp"]["flows_expired"] >= 2
