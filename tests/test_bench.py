"""The benchmark: ``vreplica bench --quick`` as a smoke check, and every QEMU mode it
measures delivering a benchmark-sized burst completely and in order. Nothing here asserts a
timing: figures depend on the machine; only that they were produced, and correctly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.kvm_abi import LOCAL_TIMER_VECTOR
from common.trace import elem_addr, vq_addr
from vreplica.bench import core as bench
from vreplica.bench.stages import CPU_PATHS

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("machine", "plan", "vring_only", "end_to_end", "kick_latency", "kicks_interrupts",
            "tracing", "rss", "modes", "targets", "correctness", "failures", "chaos", "rings",
            "cpu_stages")


@pytest.mark.timeout(300)
def test_quick_bench_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    js = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "bench", "--quick",
                           "--trials", "1", "--json", str(js), "--out", str(out)],
                          capture_output=True, text=True, timeout=280, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / "BENCHMARKS.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(js.read_text())
    assert set(SECTIONS) <= set(res)
    assert res["failures"] == []
    assert [t["key"] for t in res["targets"]] == list(bench.TARGETS)
    for t in res["targets"]:
        # n/a only for a path this tree does not measure
        unmeasured = t["key"].startswith("vhost_user") and "vhost-user" not in bench.MODES
        assert t["result"] in (("n/a",) if unmeasured else ("PASS", "FAIL")), t
        assert t["target"] in md
    assert res["chaos"]["verdict"] == "PASS", res["chaos"]
    assert res["chaos"]["resets"] >= 1 and res["chaos"]["restarts"] >= 1
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7.", "## 8.",
                    "## 9.", "## 10.", "## 11."):
        assert heading in md
    for mode in CPU_PATHS:  # section 11: every path's stages, found by their threads' names
        for size in bench.QUICK.sizes:
            c = res["cpu_stages"][mode][str(size)]["us_per_packet"]
            assert c["guest"] > 0 and c["KVM vCPU thread"] > 0, (mode, size, c)
            device = {"tap+vhost": "vhost worker",
                      "vhost-user": "vhost-user backend"}.get(mode, "QEMU main loop")
            assert c[device] > 0, (mode, size, c)
            if device != "QEMU main loop":  # QEMU's main loop no longer moves the packets
                assert c.get("QEMU main loop", 0) < c[device], c
    for ring in ("split", "packed"):  # section 10: the same device on both rings
        for size in bench.QUICK.sizes:
            r = res["rings"]["per_ring"][ring][str(size)]
            assert r["trials"] == 1 and r["all_delivered_in_order"], (ring, size, r)
            assert r["pps"] > 0 and r["kicks_per_packet"] is not None
    assert res["vring_only"]["complete"]
    runs = res["correctness"]
    plan = bench.QUICK
    # each mode, --trace, the mp.Queue+sendto baseline and sendto() alone, one trial each
    assert len(runs) == len(plan.sizes) * (len(plan.modes) + 3)
    bad = [r for r in runs if not (r["complete"] and r["in_order"] and r["bad_payloads"] == 0
                                   and r["received"] == r["expected"])]
    assert not bad, bad
    for mode in plan.modes:
        for size in plan.sizes:
            assert res["modes"][mode][str(size)]["all_delivered_in_order"], (mode, size)
    for size in plan.sizes:
        assert res["end_to_end"][str(size)]["sendto_alone_pps"] > 0
    for key in ("ioeventfd_on", "ioeventfd_off"):
        assert res["kick_latency"][key]["p50_us"] is not None
    assert all(r["matched"] > 0 for r in res["kick_latency"]["runs"])
    assert all(r["matched"] > 0 and r["tx"] == "timer"
               for r in res["kick_latency"]["runs_tx_timer"])
    assert res["kick_latency"]["tx_timer"]["notify_to_pop_p50_us"] is not None
    for irq in bench.IRQ_MODES:
        assert res["kick_latency"]["notify_irq"][irq]["matched"] > 0, irq
        assert f"notify -> interrupt, {irq}" in md


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", bench.SIZES)
@pytest.mark.parametrize("mode", list(bench.MODES))
def test_mode_delivers_everything_in_order(mode: str, size: int) -> None:
    opts = bench.replica_options(bench.QUICK, size, **bench.MODES[mode])
    r = bench.run_replica(opts, sample_rss=False)
    sink = r["sink"]
    assert r["sent"] == opts.packets
    assert sink["received"] == opts.packets, sink
    assert sink["complete"] and sink["in_order"], sink
    assert sink["bad_payloads"] == 0 and sink["duplicates"] == 0 and sink["extra"] == 0
    assert not r["device_errors"]
    assert r["tx_drained"]
    if mode.startswith("poll-us"):  # each partial burst ends in a poll (at least the last)
        assert r["tx_polls"] > 0, r
    else:
        assert r["tx_polls"] == 0, r


def test_kick_pop_matching() -> None:
    """Kicks pair with the pop of the buffer they announced; a buffer popped first is counted
    apart, and the stage times come from the first event between kick and pop."""
    guest = {"role": "guest", "records": [
        [1000, 1, "i", "virtqueue_kick_prepare", {"vq": "output.0", "old": 0, "new": 1,
                                                   "needs_kick": True}],
        [1100, 1, "B", "virtqueue_notify", None],
        [5000, 1, "i", "virtqueue_kick_prepare", {"vq": "input.0", "old": 0, "new": 9,
                                                   "needs_kick": True}],
        [9000, 1, "i", "virtqueue_kick_prepare", {"vq": "output.0", "old": 1, "new": 2,
                                                   "needs_kick": True}],
        [9100, 1, "B", "virtqueue_notify", None],
    ]}
    kvm = {"role": "kvm", "records": [[1600, 7, "i", "ioeventfd_write", {}]]}
    qemu = {"role": "qemu", "records": [
        [4100, 3, "i", "virtqueue_pop", {"vq": vq_addr(1), "elem": elem_addr(1, 0)}],
        [6000, 3, "i", "virtqueue_pop", {"vq": vq_addr(0), "elem": elem_addr(0, 0)}],
        [8000, 3, "i", "virtqueue_pop", {"vq": vq_addr(1), "elem": elem_addr(1, 1)}],
        [8500, 3, "i", "virtqueue_pop", {"vq": vq_addr(0), "elem": elem_addr(0, 1)}],
    ]}
    r = bench.kick_pop_latencies([guest, kvm, qemu], ("ioeventfd_write",))
    assert r["kicks"] == 2 and r["matched"] == 1 and r["popped_before_kick"] == 1
    assert r["p50_us"] == pytest.approx(3.0)
    assert r["stages_p50_us"]["ioeventfd_write"] == pytest.approx(0.5)


def test_notify_irq_matching() -> None:
    """A notify pairs with the guest's next handler entry of a device vector; the timer's
    vector does not count, and a notify followed by another before the handler shares it."""
    qemu = {"role": "qemu", "records": [
        [1000, 3, "i", "virtio_notify", {"vq": "TX(q1)"}],
        [5000, 3, "i", "virtio_notify", {"vq": "RX(q0)"}],
        [5200, 3, "i", "virtio_notify", {"vq": "TX(q1)"}],
        [9000, 3, "i", "virtio_notify", {"vq": "TX(q1)"}],
    ]}
    guest = {"role": "guest", "records": [
        [1500, 1, "i", "irq_handler_entry", {"irq": LOCAL_TIMER_VECTOR}],
        [3000, 1, "i", "irq_handler_entry", {"irq": 40}],
        [6200, 1, "i", "irq_handler_entry", {"irq": 39}],
    ]}
    r = bench.notify_irq_latencies([qemu, guest])
    assert r["notifies"] == 4 and r["matched"] == 2
    assert r["p50_us"] == pytest.approx(1.0) and r["max_us"] == pytest.approx(2.0)
