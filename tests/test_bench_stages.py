"""The benchmark's CPU per stage: threads are found by the names the OS shows for them, and
the CPU time the sampler reads for a thread is the time that thread itself says it used."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vreplica.bench.stages import (
    STAGES,
    ThreadCpuSampler,
    fold,
    notification_cost,
    per_packet,
    stage_of,
)

CHILD = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from common.threads import set_thread_name

set_thread_name("qemuproc")
used = {}

def burn(name, cpu_s):
    set_thread_name(name)
    while time.thread_time() < cpu_s:
        pass
    used[name] = time.thread_time()

ts = [threading.Thread(target=burn, args=("CPU 0/KVM", 0.3)),
      threading.Thread(target=burn, args=("notifier-bridge", 0.1))]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(f"{time.monotonic_ns()} {used['CPU 0/KVM']} {used['notifier-bridge']}", flush=True)
sys.stdin.read()
"""


def test_stage_names() -> None:
    assert stage_of("guestproc", "guestproc (main)") == "guest"
    assert stage_of("kvmproc", "vcpu0") == "KVM vCPU thread"
    assert stage_of("kvmproc", "kvmproc (main)") == "KVM main thread (VM ioctls)"
    assert stage_of("kvmproc", "vhost-1234") == "vhost worker"
    assert stage_of("vhost-1234", "vhost-1234 (main)") == "vhost worker"
    assert stage_of("qemuproc", "qemuproc (main)") == "QEMU main loop"
    assert stage_of("qemuproc", "qemuproc") == "QEMU, other threads (notifier bridges, monitor)"
    assert stage_of("qemuproc", "CPU 0/KVM") == "QEMU vCPU thread"
    assert len({s for s, _, _ in STAGES}) == len(STAGES)


@pytest.mark.timeout(60)
def test_sampler_reads_each_named_threads_cpu() -> None:
    repo = str(Path(__file__).resolve().parent.parent)
    t0 = time.monotonic_ns()
    child = subprocess.Popen([sys.executable, "-c", CHILD, repo], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    sampler = ThreadCpuSampler(os.getpid(), lambda comm: comm == "qemuproc", interval=0.002)
    try:
        line = child.stdout.readline() if child.stdout else ""
        t1_s, vcpu_s, bridge_s = line.split()
        t1 = int(t1_s)
        deadline = time.monotonic() + 5
        while (not sampler.times or sampler.times[-1] <= t1) and time.monotonic() < deadline:
            time.sleep(0.01)  # until a sample after the child's report
    finally:
        sampler.stop()
        if child.stdin:
            child.stdin.close()
        child.wait(10)
    w = sampler.window(t0, t1)
    st = w["stages_ns"]
    # what each thread said it used, against what the sampler read for it (by its name)
    assert st["QEMU vCPU thread"] / 1e9 == pytest.approx(float(vcpu_s), rel=0.1)
    assert st["QEMU, other threads (notifier bridges, monitor)"] / 1e9 == pytest.approx(
        float(bridge_s), rel=0.1)
    assert st.get("QEMU main loop", 0.0) / 1e9 < 0.1  # the main thread only waited
    pp = per_packet(w, 1000)
    assert pp["us_per_packet"]["QEMU vCPU thread"] == pytest.approx(float(vcpu_s) * 1000,
                                                                    rel=0.1)
    assert pp["device_us_per_packet"] == pytest.approx(pp["total_us_per_packet"])
    f = fold([{"cpu": pp}, {"cpu": pp}])
    assert f is not None and f["trials"] == 2
    assert f["device_us_per_packet"] == pytest.approx(pp["device_us_per_packet"])


def test_notification_cost() -> None:
    """event_idx off adds 0.5 kicks and interrupts per packet and 10 us of guest CPU and 4 us
    of QEMU's per packet: 20 and 8 us per kick or interrupt."""
    def path(guest: float, qemu: float) -> dict:
        return {"us_per_packet": {"guest": guest, "QEMU main loop": qemu},
                "total_us_per_packet": guest + qemu}

    paths = {"default": {"64": path(5.0, 10.0)}, "event-idx=off": {"64": path(15.0, 14.0)}}
    c = notification_cost(paths, {"default": {"64": 0.01}, "event-idx=off": {"64": 0.51}}, "64")
    assert c == pytest.approx({"guest": 20.0, "QEMU main loop": 8.0, "all stages": 28.0})
    # too few events added to divide by: no figure
    assert notification_cost(paths, {"default": {"64": 0.01}, "event-idx=off": {"64": 0.02}},
                             "64") is None
