"""A replica run in the background for the monitor tests, and its monitors.

Each run lives under a runs root of the test module's own (VREPLICA_RUNS), so ``attach``
finds it without --run and other sessions' runs stay out of the way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from common.ipc import RunConfig, object_entries
from common.monitor.client import query
from common.monitor.commands import MonitorError
from common.virtio_abi import VIRTIO_MSI_NO_VECTOR as VIRTIO_NO_VECTOR

ROLES = ("guest", "kvm", "qemu")


def run_summary(tmp_path: Path, *args: str, timeout: float = 90) -> dict[str, Any]:
    """``vreplica run ARGS`` to its end; its summary (--summary-json), status 0 asserted."""
    out = tmp_path / f"summary-{time.monotonic_ns()}.json"
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "run", *args,
                           "--summary-json", str(out)], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


@contextlib.contextmanager
def private_runs_root() -> Iterator[Path]:
    """A runs root of the caller's own; nothing may be left in it at the end."""
    root = Path(tempfile.mkdtemp(prefix="vrm-", dir="/tmp"))
    os.chmod(root, 0o700)
    yield root
    left = [p.name for p in root.iterdir() if not p.name.startswith("summary-")]
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"run directories left behind: {left}"


class Replica:
    """``vreplica run ARGS --summary-json`` in the background, and its monitors."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.env = dict(os.environ, VREPLICA_RUNS=str(root))
        self.env.pop("VREPLICA_TRACE", None)
        fd, name = tempfile.mkstemp(prefix="summary-", suffix=".json", dir=root)
        os.close(fd)
        self.summary_path = Path(name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vreplica.cli", "run", *args, "--summary-json",
             str(self.summary_path)], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.cfg = self._find_run()
        self.rundir = Path(self.cfg.rundir)
        for role in ROLES:
            self.wait_for(lambda r=role: self._answers(r), 20, f"the {role} monitor")

    def _find_run(self) -> RunConfig:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            for d in self.root.iterdir():
                if d.is_dir() and not d.name.startswith("."):
                    try:
                        cfg = RunConfig.load(d)
                    except (OSError, ValueError, TypeError):
                        continue
                    if cfg.supervisor_pid == self.proc.pid:
                        return cfg
            time.sleep(0.05)
        raise AssertionError("the run did not appear")

    def _answers(self, role: str) -> bool:
        try:
            self.q(role, "info status")
            return True
        except (OSError, MonitorError):
            return False

    def q(self, role: str, cmd: str) -> Any:
        return query(self.rundir, role, cmd)

    def wait_for(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_program_done(self) -> None:
        self.wait_for(lambda: self.q("guest", "info status")["program"] == "done", 30,
                      "the guest program")

    def wait_parked(self, role: str) -> None:
        """Until every thread of ``role`` that a stop holds is at its safe point."""
        threads: dict = {}

        def parked() -> bool:
            threads.update(self.q(role, "info status")["threads"])
            if (role == "qemu" and threads["CPU 0/KVM"]["state"] == "stopping"
                    and self.q("kvm", "info vcpu")["halted"]):
                # KVM here ends a halted vCPU's KVM_RUN on an interrupt only, not on QEMU's
                # SIG_IPI alone (real KVM returns -EINTR): an NMI lets it see the signal
                self.q("kvm", "nmi")
            return all(t["state"] == "parked" for t in threads.values())

        try:
            self.wait_for(parked, 10, f"{role}'s threads at their safe points")
        except AssertionError as e:
            raise AssertionError(f"{e}: {threads}") from None

    def wait_quiet(self) -> dict:
        """Until the held guest idles with nothing on its way to it: every interrupt QEMU
        raised has reached KVM (a KVM_SIGNAL_MSI or KVM_IRQ_LINE_STATUS each), and vCPU 0 is
        halted afterwards with no vector pending or in service and no timer armed. KVM's
        counters are then still."""
        def notifies() -> int:
            """virtio_notify calls that raise an interrupt: under MSI-X a queue without a
            vector (the control queue: Linux gives it none) raises nothing."""
            queues = self.q("qemu", "info stats")["queues"].values()
            msix = any(q["vector"] != VIRTIO_NO_VECTOR for q in queues)
            return sum(q["notifies"] for q in queues
                       if not msix or q["vector"] != VIRTIO_NO_VECTOR)

        def quiet() -> dict | None:
            raised = notifies()
            kvm = self.q("kvm", "info kvm")
            vcpu = self.q("kvm", "info vcpu")
            idle = (vcpu["halted"] and not vcpu["irr"] and not vcpu["isr"]
                    and not vcpu["apic_timer_armed"])
            sent = kvm["vcpu"]["signal_msis"] + kvm["vcpu"]["irq_lines"]
            delivered = sent >= raised == notifies()
            return kvm if idle and delivered and kvm == self.q("kvm", "info kvm") else None

        return self.wait_for(quiet, 20, "the VM to go quiet")

    def attach(self, role: str, *args: str, pick: bool = True) -> subprocess.CompletedProcess:
        """``vreplica attach ROLE ARGS`` (with ``--run`` this run unless ``pick`` is off)."""
        run = ["--run", self.cfg.rid] if pick else []
        return subprocess.run([sys.executable, "-m", "vreplica.cli", "attach", role, *run,
                               *args], env=self.env, capture_output=True, text=True, timeout=30)

    def quit(self) -> dict:
        """``quit`` on QEMU's monitor: all three exit, the run ends with its summary."""
        assert self.q("qemu", "quit") == {}
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        assert out.startswith(f"run {self.cfg.rid}:"), out
        self.assert_gone()
        return json.loads(self.summary_path.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the supervisor stops the run in order
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        self.assert_gone()

    def assert_gone(self) -> None:
        """Nothing of the run is left: objects, directory, processes."""
        deadline = time.monotonic() + 5
        while True:
            left = [str(p) for p in object_entries(self.cfg.rid)]
            if self.rundir.exists():
                left.append(str(self.rundir))
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if self.cfg.rundir in cmd and any(f"{r}proc" in cmd for r in ROLES):
                    left.append(f"pid {p.pid}: {' '.join(cmd)}")
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not left, f"left behind by run {self.cfg.rid}: {left}"
