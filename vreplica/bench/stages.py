"""bench: CPU time per packet of each stage a packet passes through, per data path.

A stage is a thread of one of the run's processes, found by the names the OS shows for it
(``/proc/PID/comm`` and ``/proc/PID/task/TID/comm``, as ``ps -L`` and ``top -H`` show them):
the guest, KVM's vCPU thread, vhost-net's worker ``vhost-<QEMU pid>``, QEMU's main loop and
its vCPU thread ``CPU 0/KVM``. Each thread's CPU time is read from
``/proc/PID/task/TID/schedstat`` (nanoseconds on CPU; ``stat``'s utime + stime, counted in
10 ms ticks, where schedstat is missing), sampled while the run goes on, and taken over the
window of the guest's first send to the host's last arrival.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

MAIN = "(main)"
"""Stands after the name of a process's first thread (tid = pid): its main thread."""

STAGES: tuple[tuple[str, str, str], ...] = (
    ("guest", "guestproc", "*"),
    ("vhost worker", "*", "vhost-[0-9]*"),
    ("vhost-user backend", "vhostuserproc", "*"),
    ("KVM vCPU thread", "kvmproc", "vcpu0"),
    ("KVM main thread (VM ioctls)", "kvmproc", f"* {MAIN}"),
    ("KVM, other threads (irqfds, APIC timer)", "kvmproc", "*"),
    ("QEMU main loop", "qemuproc", f"* {MAIN}"),
    ("QEMU vCPU thread", "qemuproc", "CPU 0/KVM"),
    ("QEMU, other threads (notifier bridges, monitor)", "qemuproc", "*"),
)
"""(stage, process name, thread name) as fnmatch patterns; a thread counts in the first
stage that matches it."""

DEVICE_STAGES = frozenset(s for s, _, _ in STAGES if s != "guest")
"""Everything but the guest: the device side, which each data path does its own way."""

CPU_PATHS: dict[str, tuple[str, str]] = {
    "default": ("slirp", "QEMU's user-mode network (libslirp) in the main loop"),
    "tap": ("tap", "QEMU's tap backend: the main loop writes each frame to the tap"),
    "tap+vhost": ("tap+vhost", "vhost-net: the worker serves the rings and writes the tap"),
    "vhost-user": ("vhost-user", "the vhost-user back end process serves the rings and writes "
                   "the tap"),
    "event-idx=off": ("slirp, event_idx off", "slirp with VIRTIO_RING_F_EVENT_IDX off: an "
                      "interrupt for nearly every flush, each a KVM_SIGNAL_MSI round trip to "
                      "the KVM process, an IPI signal to the guest and its EOI exit"),
}
"""End-to-end modes (bench MODES) whose runs the stage table reads: a path is one line here,
with its column name and what serves the rings on it."""

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
YOUNG_SAMPLES = 10
"""Samples over which a new thread's name is read again (it may rename itself late)."""


def stage_of(proc: str, thread: str) -> str:
    for stage, p, t in STAGES:
        if fnmatchcase(proc, p) and fnmatchcase(thread, t):
            return stage
    return f"{proc}, other"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def thread_cpu_ns(pid: int, tid: int) -> int | None:
    """CPU time of one thread so far, in nanoseconds."""
    s = _read(f"/proc/{pid}/task/{tid}/schedstat")
    if s:
        return int(s.split()[0])
    s = _read(f"/proc/{pid}/task/{tid}/stat")
    if not s:
        return None
    fields = s.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_NS  # utime, stime


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (a worker process a run's process starts comes in too)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _read(f"/proc/{entry}/stat")
            if s:
                ppid = int(s.rpartition(")")[2].split()[1])
                kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


class ThreadCpuSampler:
    """Every thread's CPU time, sampled while a run goes on, of the processes below
    ``root`` that ``wanted`` names (their process names)."""

    def __init__(self, root: int, wanted: Callable[[str], bool], interval: float = 0.005,
                 rescan_every: int = 10, pids: tuple[int, ...] = ()) -> None:
        self.root = root
        self.wanted = wanted
        self.interval = interval
        self.rescan_every = rescan_every
        self.times: list[int] = []
        self.samples: list[dict[int, int]] = []
        self.names: dict[int, tuple[str, str]] = {}  # tid -> (process, thread)
        self.pids: dict[int, str] = dict.fromkeys(pids, "?")
        """The processes sampled, with their names (``pids``: known from the start, whatever
        they are called yet; others join as a rescan finds them below ``root``)."""
        self._young: dict[int, int] = {}  # tid -> samples left in which its name is read again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        for pid in descendants(self.root):
            comm = (_read(f"/proc/{pid}/comm") or "").strip()
            if pid not in self.pids and self.wanted(comm):
                self.pids[pid] = comm
        for pid in list(self.pids):
            comm = (_read(f"/proc/{pid}/comm") or "").strip()
            if not comm:
                continue
            self.pids[pid] = comm
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for t in tids:
                self._name(pid, int(t))

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if n % self.rescan_every == 0:
                self._scan()
            n += 1
            t = time.monotonic_ns()
            # a thread that exited keeps its last figure
            sample = dict(self.samples[-1]) if self.samples else {}
            for pid in self.pids:
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for t_ in tids:
                    tid = int(t_)
                    ns = thread_cpu_ns(pid, tid)
                    if ns is None:
                        continue
                    if tid not in sample:  # a new thread: it names itself as it starts
                        self._young[tid] = YOUNG_SAMPLES
                    if self._young.get(tid):
                        self._young[tid] -= 1
                        self._name(pid, tid)
                    sample[tid] = ns
            self.times.append(t)
            self.samples.append(sample)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._scan_names_last()

    def _scan_names_last(self) -> None:
        """Names as they ended up (a thread names itself after it starts)."""
        for pid in list(self.pids):
            try:
                for t in os.listdir(f"/proc/{pid}/task"):
                    self._name(pid, int(t))
            except OSError:
                pass

    def _name(self, pid: int, tid: int) -> None:
        name = (_read(f"/proc/{pid}/task/{tid}/comm") or "").strip()
        if name:
            self.names[tid] = (self.pids[pid], f"{name} {MAIN}" if tid == pid else name)

    def at(self, t_ns: int) -> dict[int, float]:
        """Each thread's CPU ns at ``t_ns``, interpolated between the samples around it."""
        i = bisect_left(self.times, t_ns)
        if i == 0 or i >= len(self.times):
            j = min(max(i, 0), len(self.samples) - 1) if self.samples else -1
            return dict(self.samples[j]) if j >= 0 else {}
        t0, t1 = self.times[i - 1], self.times[i]
        a, b = self.samples[i - 1], self.samples[i]
        f = (t_ns - t0) / (t1 - t0) if t1 > t0 else 1.0
        return {tid: a.get(tid, 0) + f * (ns - a.get(tid, 0)) for tid, ns in b.items()}

    def window(self, t0_ns: int, t1_ns: int) -> dict[str, Any]:
        """CPU ns per stage between two instants, and the share of them the samples cover.

        With two samples or more inside, the CPU is taken between the first and the last of
        them (``covered`` < 1): a gap in the sampling (the sampler waits for a CPU on a busy
        machine) then leaves out what the processes did outside the window, their start and
        exit, instead of spreading it over the window. Otherwise both ends are interpolated.
        """
        i0 = bisect_left(self.times, t0_ns)
        i1 = bisect_left(self.times, t1_ns + 1) - 1
        if i1 > i0:
            start, end = self.samples[i0], self.samples[i1]
            covered = (self.times[i1] - self.times[i0]) / (t1_ns - t0_ns)
        else:
            start, end = self.at(t0_ns), self.at(t1_ns)
            covered = 1.0
        stages: dict[str, float] = {}
        threads: dict[str, float] = {}
        for tid, ns in end.items():
            d = ns - start.get(tid, 0)
            proc, thr = self.names.get(tid, ("?", "?"))
            stage = stage_of(proc, thr)
            stages[stage] = stages.get(stage, 0.0) + d
            threads[f"{proc}/{thr}"] = threads.get(f"{proc}/{thr}", 0.0) + d
        return {"stages_ns": stages, "threads_ns": threads,
                "samples_in_window": max(0, i1 - i0 + 1), "covered": covered}


def per_packet(window: dict[str, Any], packets: int) -> dict[str, Any]:
    """A window's CPU per stage divided by the packets it carried (microseconds); for the
    part of the window the samples cover, that share of the packets."""
    packets_covered = packets * window.get("covered", 1.0)
    us = {s: ns / packets_covered / 1000 for s, ns in window["stages_ns"].items()}
    return {"us_per_packet": us,
            "device_us_per_packet": sum(v for s, v in us.items() if s in DEVICE_STAGES),
            "total_us_per_packet": sum(us.values()),
            "threads_us_per_packet": {t: ns / packets_covered / 1000
                                      for t, ns in window["threads_ns"].items()},
            "samples_in_window": window["samples_in_window"], "packets": packets,
            "covered": window.get("covered", 1.0)}


def wanted(comm: str) -> bool:
    """The processes whose threads are stages: the run's three, a vhost worker process,
    a vhost-user backend."""
    return comm in ("guestproc", "kvmproc", "qemuproc", "vhostuserproc") \
        or fnmatchcase(comm, "vhost-[0-9]*")


def run_window(sampler: ThreadCpuSampler, first_send_ns: int | None,
               sink: dict[str, Any]) -> dict[str, Any] | None:
    """The stages' CPU per packet over one run: the guest's first send to the last arrival."""
    n = sink.get("received") or 0
    if not first_send_ns or n < 2 or sink["last_ns"] <= first_send_ns:
        return None
    return per_packet(sampler.window(first_send_ns, sink["last_ns"]), n)


def fold(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians over a mode's trials of each stage's CPU per packet."""
    got = [r["cpu"] for r in runs if r.get("cpu")]
    if not got:
        return None
    stages = sorted({s for g in got for s in g["us_per_packet"]})
    return {
        "us_per_packet": {s: statistics.median(g["us_per_packet"].get(s, 0.0) for g in got)
                          for s in stages},
        "device_us_per_packet": statistics.median(g["device_us_per_packet"] for g in got),
        "total_us_per_packet": statistics.median(g["total_us_per_packet"] for g in got),
        "device_range": (min(g["device_us_per_packet"] for g in got),
                         max(g["device_us_per_packet"] for g in got)),
        "trials": len(got),
    }


def fold_paths(runs: list[dict[str, Any]], sizes: tuple[int, ...]) -> dict[str, Any]:
    """Per path and size, the medians of the stages' CPU per packet (runs: bench's
    end-to-end runs, each with its mode and size)."""
    out: dict[str, Any] = {}
    for mode in CPU_PATHS:
        for size in sizes:
            f = fold([r for r in runs if r.get("mode") == mode and r.get("size") == size])
            if f is not None:
                out.setdefault(mode, {})[str(size)] = f
    return out


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def notification_cost(paths: dict[str, Any], events: dict[str, dict[str, float | None]],
                      size: str) -> dict[str, float] | None:
    """Each stage's CPU per kick or interrupt: what slirp with event_idx off costs per packet
    beyond the default mode, over the kicks and interrupts per packet it adds (``events``:
    mode -> size -> kicks + interrupts per packet)."""
    a, b = paths.get("event-idx=off", {}).get(size), paths.get("default", {}).get(size)
    ea, eb = events.get("event-idx=off", {}).get(size), events.get("default", {}).get(size)
    if not a or not b or ea is None or eb is None or ea - eb < 0.05:
        return None
    per = {st: (a["us_per_packet"].get(st, 0.0) - b["us_per_packet"].get(st, 0.0)) / (ea - eb)
           for st in a["us_per_packet"]}
    per["all stages"] = (a["total_us_per_packet"] - b["total_us_per_packet"]) / (ea - eb)
    return per


def render(paths: dict[str, Any], sizes: tuple[int, ...], size_label: dict[int, str],
           section: str, events: dict[str, dict[str, float | None]] | None = None) -> list[str]:
    """The stage table: one column per path and size, one row per stage; with ``events``,
    what a kick or interrupt costs each stage."""
    cols = [(m, s) for m in CPU_PATHS for s in sizes if str(s) in paths.get(m, {})]
    if not cols:
        return []
    stages = [s for s, _, _ in STAGES
              if any(paths[m][str(z)]["us_per_packet"].get(s) for m, z in cols)]
    head = ["CPU us per packet"] + [f"{CPU_PATHS[m][0]} {size_label[z]}" for m, z in cols]
    rows = [[st] + [_us(paths[m][str(z)]["us_per_packet"].get(st)) for m, z in cols]
            for st in stages]
    rows.append(["**device side (all but the guest)**"]
                + [f"**{_us(paths[m][str(z)]['device_us_per_packet'])}**" for m, z in cols])
    rows.append(["device side, range over trials"]
                + ["-".join(_us(x) for x in paths[m][str(z)]["device_range"]) for m, z in cols])
    rows.append(["total"] + [_us(paths[m][str(z)]["total_us_per_packet"]) for m, z in cols])
    L = [f"## {section}. CPU per packet, per stage", "",
         "From the end-to-end runs of section 2 (the guest sends back to back): each thread's "
         "CPU time over the window from the guest's first send to the host's last arrival "
         "(`/proc/PID/task/TID/schedstat`, sampled every 5 ms; taken between the first and last "
         "samples inside the window, over the packets of the time they span), "
         "divided by the packets delivered in it; medians over the trials. Threads are found "
         "by the names the OS shows for them: `guestproc`; KVM's `vcpu0` and main thread (the "
         "VM ioctls: KVM_SIGNAL_MSI, KVM_IRQ_LINE_STATUS); `vhost-<QEMU pid>`; QEMU's main "
         "thread (its main loop) and `CPU 0/KVM`. The paths:", ""]
    L += [f"* {short}: {what}" for short, what in CPU_PATHS.values()] + [""]
    L += ["Where the guest's one Python process bounds the throughput, the packet rate hides "
          "what a data plane saves; its CPU per packet shows it. The stages run in parallel, so "
          "the slowest one (the largest figure) bounds the rate a path can reach. What fidelity "
          "costs shows in the rows: an interrupt from QEMU's main loop is a KVM_SIGNAL_MSI VM "
          "ioctl, a round trip to the KVM process's main thread (a microsecond syscall in KVM), "
          "and its delivery a signal to the guest and an EOI exit through KVM's vCPU thread; "
          "the event_idx-off column is that path taken for nearly every flush.", ""]
    L += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    L += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    costs = {str(z): notification_cost(paths, events or {}, str(z)) for z in sizes}
    costs = {z: c for z, c in costs.items() if c}
    if costs:
        L += ["What one kick or interrupt costs: the event_idx-off column minus the slirp "
              "column, over the kicks and interrupts per packet event_idx off adds "
              "(section 7).", "",
              "| CPU us per kick or interrupt | "
              + " | ".join(size_label[int(z)] for z in costs) + " |",
              "|---|" + "---|" * len(costs)]
        names = [st for st, _, _ in STAGES if any(st in c for c in costs.values())]
        for st in [*names, "all stages"]:
            L.append(f"| {st} | " + " | ".join(_us(c.get(st)) for c in costs.values()) + " |")
        L.append("")
    return L
