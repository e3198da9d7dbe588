"""QEMU's side of vhost-net as 7.2 has it, read from the trace of a real run with
``--netdev tap --vhost on``: who serves the host notifiers while vhost runs
(virtio_bus_grab_ioeventfd), and where the guest notifiers are released (vhost_net_stop,
reached from a device reset through virtio_reset)."""

from __future__ import annotations

from pathlib import Path

import pytest
from replica import run_summary

from common.netns import privilege_problem
from vreplica.trace.tracefile import Event, Trace, load_trace

pytestmark = [pytest.mark.usefixtures("no_leftovers"),
              pytest.mark.skipif(privilege_problem() is not None,
                                 reason=f"--netdev tap: {privilege_problem()}")]

CTRL, TX, RX = 2, 1, 0


def vhost_run(tmp_path: Path, *args: str) -> tuple[dict, Trace]:
    out = tmp_path / "vhost.json"
    s = run_summary(tmp_path, "--netdev", "tap", "--vhost", "on", "--trace", str(out),
                    "--timeout", "60", *args)
    return s, load_trace(out)


def spans(t: Trace, name: str) -> list[Event]:
    return [e for e in t.events if e.name == name and e.is_span and e.role == "qemu"]


def kicks(t: Trace, n: int) -> list[Event]:
    return [e for e in t.events if e.name == "virtio_queue_notify" and not e.is_span
            and e.role == "qemu" and e.args["n"] == n]


def during(t: Trace, e: Event, start: Event, stop: Event | None) -> bool:
    return start.end <= e.ts and (stop is None or e.ts <= stop.ts)


@pytest.mark.timeout(120)
def test_vhost_grabs_every_ioeventfd_so_control_kicks_exit_to_the_vcpu_thread(
        tmp_path: Path) -> None:
    """While vhost runs QEMU serves none of its ioeventfds (the grab is a count, not a set of
    queues), and vhost assigns only its own: each of the driver's control-queue kicks is a
    port write that KVM hands to QEMU's vCPU thread, which runs the control queue there."""
    s, t = vhost_run(tmp_path, "--packets", "20")
    assert s["host"]["received"] == 20
    (start,) = spans(t, "vhost_net_start")
    (stop,) = spans(t, "vhost_net_stop")
    ctrl = [k for k in kicks(t, CTRL) if during(t, k, start, stop)]
    assert len(ctrl) >= 1
    assert {t.thread_name(k) for k in ctrl} == {"CPU 0/KVM"}
    assert all("kvm_handle_io" in [a.name for a in k.ancestors()] for k in ctrl)
    assert not [k for n in (RX, TX) for k in kicks(t, n) if during(t, k, start, stop)]
    reads = [e for e in spans(t, "virtio_queue_host_notifier_read") if during(t, e, start, stop)]
    assert reads == []  # no ioeventfd of QEMU's fired while vhost held them


@pytest.mark.timeout(120)
def test_vhost_net_stop_releases_the_guest_notifiers_and_reset_reaches_it_by_virtio_reset(
        tmp_path: Path) -> None:
    """A broken TX chain: vhost reports the vring error, the guest resets the device (status
    0: virtio_set_status, then virtio_pci_reset's virtio_reset). virtio_net_set_status stops
    vhost; that stop ends by releasing the guest notifiers (set_guest_notifiers false), and
    nothing else releases them: not the proxy's reset."""
    s, t = vhost_run(tmp_path, "--packets", "50", "--guest-fault", "loop")
    assert s["vhost"]["qemu"]["vring_errors"] == 1
    stops = spans(t, "vhost_net_stop")
    assert len(stops) == 2 and len(spans(t, "vhost_net_start")) == 2
    for stop in stops:
        children = [e for e in t.thread_events(stop.thread_key)
                    if e.is_span and e.parent is stop]
        assert [c.name for c in children][-1] == "virtio_pci_set_guest_notifiers"
    by_reset = [a.name for a in stops[0].ancestors()]
    assert by_reset[0] == "virtio_set_status" and "virtio_ioport_write" in by_reset, by_reset
    notifiers = spans(t, "virtio_pci_set_guest_notifiers")
    assert len(notifiers) == 4
    assert [e.parent.name for e in notifiers if e.parent is not None] == \
        ["vhost_net_start", "vhost_net_stop"] * 2
