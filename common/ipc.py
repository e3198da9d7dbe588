"""The IPC objects of one run: their names, creation, and removal (also of dead runs' leftovers).

Every object's name starts with ``/vnr.<run id>.`` so that a run owns a namespace of its own;
the run directory (``/tmp/vreplica-<uid>/<run id>``, mode 0700) holds its config and sockets.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import posix_ipc
import psutil

from common.channel import Channel
from common.guest_memory import GuestMemory
from common.notifier import EventNotifier

NAME_PREFIX = "vnr."
SHM_DIR = Path("/dev/shm")
MQUEUE_DIR = Path("/dev/mqueue")

# the message queues of a run: (attribute, who sends -> who receives)
CHANNELS = {
    "guest_exit": "guest CPU -> KVM: VM exits",
    "guest_entry": "KVM -> guest CPU: VM entries (resume, IN data, injected vectors)",
    "vcpu_req": "QEMU vCPU thread -> KVM: KVM_RUN",
    "vcpu_exit": "KVM -> QEMU vCPU thread: kvm_run exits",
    "vm_req": "QEMU -> KVM: VM ioctls (KVM_IOEVENTFD, KVM_IRQFD, ...)",
    "vm_rep": "KVM -> QEMU: VM ioctl results",
    "ctl": "any process -> supervisor: ready / done / error",
}


def runs_root() -> Path:
    return Path(os.environ.get("VREPLICA_RUNS", f"/tmp/vreplica-{os.getuid()}"))


@dataclass
class RunConfig:
    """Everything the three processes need to find each other and behave as asked."""

    rid: str
    rundir: str
    supervisor_pid: int
    supervisor_started: float
    mem_size: int
    queue_size: int
    num_queues: int
    num_irqfds: int
    options: dict = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"/{NAME_PREFIX}{self.rid}."

    @property
    def ram(self) -> str:
        return self.prefix + "ram"

    def channel(self, what: str) -> str:
        return self.prefix + what

    @property
    def kick(self) -> str:
        """The vCPU's IPI: KVM signals it to make a running guest exit (kvm_vcpu_kick)."""
        return self.prefix + "kick"

    def ioeventfd(self, queue: int) -> str:
        return f"{self.prefix}ioeventfd{queue}"

    def irqfd(self, n: int) -> str:
        return f"{self.prefix}irqfd{n}"

    def semaphores(self) -> list[str]:
        return (
            [self.kick]
            + [self.ioeventfd(q) for q in range(self.num_queues)]
            + [self.irqfd(n) for n in range(self.num_irqfds)]
        )

    def save(self) -> Path:
        path = Path(self.rundir) / "config.json"
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, rundir: str | Path) -> RunConfig:
        return cls(**json.loads((Path(rundir) / "config.json").read_text()))


def new_run(mem_size: int, queue_size: int, num_queues: int, num_irqfds: int,
            options: dict) -> RunConfig:
    """Make the run directory and config (no IPC objects yet)."""
    root = runs_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    rid = secrets.token_hex(4)
    rundir = root / rid
    rundir.mkdir(mode=0o700)
    me = psutil.Process()
    cfg = RunConfig(rid, str(rundir), me.pid, me.create_time(), mem_size, queue_size,
                    num_queues, num_irqfds, options)
    cfg.save()
    return cfg


def create_objects(cfg: RunConfig) -> None:
    """Create guest RAM, the channels and the notifiers, all mode 0600."""
    GuestMemory(cfg.ram, cfg.mem_size, create=True).close()
    for what in CHANNELS:
        Channel(cfg.channel(what), create=True).close()
    for name in cfg.semaphores():
        EventNotifier(name, create=True).close()


def object_entries(rid: str) -> list[Path]:
    """The run's objects as the file system shows them (mqueue must be mounted to list queues)."""
    tag = f"{NAME_PREFIX}{rid}."
    found = [p for p in SHM_DIR.glob("*") if p.name.startswith((tag, "sem." + tag))]
    if MQUEUE_DIR.is_dir():
        found += [p for p in MQUEUE_DIR.glob("*") if p.name.startswith(tag)]
    return found


def unlink_objects(cfg: RunConfig) -> None:
    """Unlink every object of the run; idempotent, safe from any process of the run."""
    GuestMemory.unlink(cfg.ram)
    for what in CHANNELS:
        Channel.unlink(cfg.channel(what))
    for name in cfg.semaphores():
        EventNotifier.unlink(name)
    unlink_entries(cfg.rid)


def unlink_entries(rid: str) -> None:
    for p in object_entries(rid):
        name = "/" + p.name
        try:
            if p.parent == MQUEUE_DIR:
                posix_ipc.unlink_message_queue(name)
            elif p.name.startswith("sem."):
                posix_ipc.unlink_semaphore("/" + p.name[4:])
            else:
                posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


def run_alive(cfg: RunConfig) -> bool:
    try:
        proc = psutil.Process(cfg.supervisor_pid)
        return abs(proc.create_time() - cfg.supervisor_started) < 0.01
    except psutil.Error:
        return False


def live_runs() -> list[RunConfig]:
    out = []
    for d in sorted(runs_root().glob("*")):
        try:
            cfg = RunConfig.load(d)
        except (OSError, ValueError, TypeError):
            continue
        if run_alive(cfg):
            out.append(cfg)
    return out


def cleanup_dead_runs() -> list[str]:
    """Remove the objects and directories of runs whose supervisor is dead; never a live run's."""
    removed = []
    root = runs_root()
    known = set()
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        known.add(d.name)
        try:
            cfg = RunConfig.load(d)
        except (OSError, ValueError, TypeError):
            cfg = None
        if cfg is not None and run_alive(cfg):
            continue
        if cfg is not None:
            unlink_objects(cfg)
        else:
            unlink_entries(d.name)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    # objects whose run directory is gone (a run makes its directory before any object)
    orphans = {p.name.removeprefix("sem.").split(".")[1] for p in _all_entries()}
    for rid in orphans - known:
        unlink_entries(rid)
        removed.append(rid)
    return removed


def _all_entries() -> list[Path]:
    found = [p for p in SHM_DIR.glob("*") if p.name.startswith((NAME_PREFIX, "sem." + NAME_PREFIX))]
    if MQUEUE_DIR.is_dir():
        found += [p for p in MQUEUE_DIR.glob(NAME_PREFIX + "*")]
    return found


def remove_run(cfg: RunConfig) -> None:
    unlink_objects(cfg)
    shutil.rmtree(cfg.rundir, ignore_errors=True)
