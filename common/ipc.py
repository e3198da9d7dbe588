"""The IPC objects of one run: their names, creation, and removal (also of dead runs' leftovers).

Every object's name starts with ``/vnr.<run id>.``, the run id being 16 random hex digits, so
that a run owns a namespace of its own that another run (or user) cannot guess. The run
directory (``/tmp/vreplica-<uid>/<run id>``, mode 0700 in a 0700 root the user owns) holds
its config, reports and monitor sockets. Objects are mode 0600 whatever the umask.

Liveness: a run is alive while its supervisor (pid and start time, in ``config.json`` and in
the header of the run's ``inflight`` segment) is. The directory is published by renaming a
complete one into place, and made before any object; the ``inflight`` segment is the first
object made and the last unlinked. So ``cleanup_dead_runs`` can tell a dead run's leftovers
from a live run at every step of its creation and removal, also when the live run's
directory is under another ``VREPLICA_RUNS`` root that it cannot see.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import shutil
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import posix_ipc
import psutil

from common import netns
from common.channel import Channel
from common.guest_memory import GuestMemory
from common.notifier import EventNotifier

NAME_PREFIX = "vnr."
SHM_DIR = Path("/dev/shm")
MQUEUE_DIR = Path("/dev/mqueue")
RID_BYTES = 8
OBJECT_MODE = 0o600
DIR_MODE = 0o700
YOUNG_S = 5.0  # an object younger than this may belong to a run still being created
RID_RE = re.compile(r"[0-9a-f]{8,32}")
NEW_RUN_RE = re.compile(r"\.([0-9a-f]{8,32})\.new")

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

# The ``inflight`` segment: this header, then one region per virtqueue (see
# common/inflight_record.py for a region's fields).
RUN_HEADER = struct.Struct("<8sIId")  # magic, version, supervisor pid, supervisor start time
RUN_HEADER_SIZE = 64
RUN_MAGIC = b"vreplica"
RUN_VERSION = 1


def inflight_region_size(queue_size: int) -> int:
    """Bytes of one virtqueue's inflight region: a 64-byte header, a byte per head (split
    ring) and a u16 per buffer id (packed ring: the ring positions the buffer took)."""
    return 64 + ((queue_size + 63) & ~63) + ((2 * queue_size + 63) & ~63)


def inflight_name(rid: str) -> str:
    """The run's header and the virtqueues' inflight regions (VHOST_USER_GET_INFLIGHT_FD)."""
    return f"/{NAME_PREFIX}{rid}.inflight"


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

    @property
    def inflight(self) -> str:
        return inflight_name(self.rid)

    @property
    def inflight_size(self) -> int:
        return RUN_HEADER_SIZE + self.num_queues * inflight_region_size(self.queue_size)

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

    def vring_err(self, queue: int) -> str:
        """vhost's error eventfd for a queue (VHOST_SET_VRING_ERR): vq_err signals it."""
        return f"{self.prefix}vringerr{queue}"

    def semaphores(self) -> list[str]:
        return (
            [self.kick]
            + [self.ioeventfd(q) for q in range(self.num_queues)]
            + [self.irqfd(n) for n in range(self.num_irqfds)]
            + ([self.vring_err(q) for q in range(self.num_queues)]
               if self.options.get("vhost") else [])
        )

    def save(self, rundir: str | Path | None = None) -> Path:
        path = Path(rundir or self.rundir) / "config.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OBJECT_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self), indent=1))
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, rundir: str | Path) -> RunConfig:
        return cls(**json.loads((Path(rundir) / "config.json").read_text()))


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def secure_root() -> Path:
    """The runs' root: made 0700 if missing; refused if it is not a directory of this user's."""
    root = runs_root()
    with _umask(0o077):
        root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if not root_is_ours(root):
        raise PermissionError(f"{root} is not a directory owned by uid {os.getuid()}")
    if stat.S_IMODE(os.lstat(root).st_mode) != DIR_MODE:
        os.chmod(root, DIR_MODE)
    return root


def root_is_ours(root: Path) -> bool:
    """A real directory (not a symlink) that this user owns."""
    try:
        st = os.lstat(root)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def new_run(mem_size: int, queue_size: int, num_queues: int, num_irqfds: int,
            options: dict) -> RunConfig:
    """Make the run directory and config (no IPC objects yet).

    The directory is filled under a hidden name and renamed into place, so a run directory
    that anyone sees always has its config.
    """
    root = secure_root()
    rid = secrets.token_hex(RID_BYTES)
    rundir = root / rid
    tmp = root / f".{rid}.new"
    with _umask(0o077):
        tmp.mkdir(mode=DIR_MODE)
    os.chmod(tmp, DIR_MODE)
    me = psutil.Process()
    cfg = RunConfig(rid, str(rundir), me.pid, me.create_time(), mem_size, queue_size,
                    num_queues, num_irqfds, options)
    cfg.save(tmp)
    tmp.rename(rundir)
    return cfg


def create_objects(cfg: RunConfig) -> None:
    """Create the inflight segment (with the run's header) first, then guest RAM, the channels
    and the notifiers; all mode 0600."""
    with _umask(0o077):
        shm = posix_ipc.SharedMemory(cfg.inflight, posix_ipc.O_CREX, mode=OBJECT_MODE,
                                     size=cfg.inflight_size)
        try:
            os.fchmod(shm.fd, OBJECT_MODE)
            with mmap.mmap(shm.fd, shm.size) as m:
                RUN_HEADER.pack_into(m, 0, RUN_MAGIC, RUN_VERSION, cfg.supervisor_pid,
                                     cfg.supervisor_started)
        finally:
            shm.close_fd()
        GuestMemory(cfg.ram, cfg.mem_size, create=True).close()
        os.chmod(SHM_DIR / cfg.ram[1:], OBJECT_MODE)
        for what in CHANNELS:
            ch = Channel(cfg.channel(what), create=True)
            os.fchmod(ch.fileno(), OBJECT_MODE)
            ch.close()
        for name in cfg.semaphores():
            EventNotifier(name, create=True).close()
            os.chmod(SHM_DIR / f"sem.{name[1:]}", OBJECT_MODE)


def object_entries(rid: str) -> list[Path]:
    """The run's objects as the file system shows them (mqueue must be mounted to list queues)."""
    tag = f"{NAME_PREFIX}{rid}."
    found = [p for p in SHM_DIR.glob("*") if p.name.startswith((tag, "sem." + tag))]
    if MQUEUE_DIR.is_dir():
        found += [p for p in MQUEUE_DIR.glob("*") if p.name.startswith(tag)]
    return found


def unlink_objects(cfg: RunConfig) -> None:
    """Unlink every object of the run, the inflight segment last; idempotent, safe from any
    process of the run."""
    GuestMemory.unlink(cfg.ram)
    for what in CHANNELS:
        Channel.unlink(cfg.channel(what))
    for name in cfg.semaphores():
        EventNotifier.unlink(name)
    unlink_entries(cfg.rid)


def unlink_entries(rid: str) -> None:
    """Unlink what the file system shows of the run (whatever the config says), its network
    namespace included, inflight last."""
    inflight = inflight_name(rid)
    netns.delete(netns.netns_name(rid))
    for p in object_entries(rid):
        name = "/" + p.name
        if name == inflight:
            continue
        try:
            if p.parent == MQUEUE_DIR:
                posix_ipc.unlink_message_queue(name)
            elif p.name.startswith("sem."):
                posix_ipc.unlink_semaphore("/" + p.name[4:])
            else:
                posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
    try:
        posix_ipc.unlink_shared_memory(inflight)
    except posix_ipc.ExistentialError:
        pass


def process_alive(pid: int, started: float) -> bool:
    """Is (pid, start time) a running process? A zombie is not: it has died, unreaped."""
    try:
        proc = psutil.Process(pid)
        return (abs(proc.create_time() - started) < 0.01
                and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def run_alive(cfg: RunConfig) -> bool:
    return process_alive(cfg.supervisor_pid, cfg.supervisor_started)


def run_owner(rid: str) -> tuple[int, float] | None:
    """(supervisor pid, start time) from the header of the run's inflight segment, if any."""
    try:
        shm = posix_ipc.SharedMemory(inflight_name(rid))
    except (posix_ipc.Error, ValueError):
        return None
    try:
        if shm.size < RUN_HEADER_SIZE:
            return None
        with mmap.mmap(shm.fd, RUN_HEADER_SIZE, prot=mmap.PROT_READ) as m:
            magic, _, pid, started = RUN_HEADER.unpack_from(m, 0)
    finally:
        shm.close_fd()
    return (pid, started) if magic == RUN_MAGIC else None


def live_runs() -> list[RunConfig]:
    out = []
    root = runs_root()
    for d in sorted(root.glob("*")) if root.is_dir() else []:  # glob skips the hidden ones
        try:
            cfg = RunConfig.load(d)
        except (OSError, ValueError, TypeError):
            continue
        if run_alive(cfg):
            out.append(cfg)
    return out


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_ctime
    except OSError:
        return 0.0


def cleanup_dead_runs() -> list[str]:
    """Remove the objects and directories of runs whose supervisor is dead; never a live run's.

    Only entries named as runs are looked at, and only in a root that is this user's own
    directory. A run directory without a readable config counts as dead (a published one
    always has one). Objects whose run directory is missing here are removed only if their
    run's header names no live supervisor, and, when there is no header, once not young.
    """
    removed = []
    root = runs_root()
    ours = root_is_ours(root)
    for d in sorted(root.iterdir()) if ours else []:
        if d.is_symlink() or not d.is_dir():
            continue
        if NEW_RUN_RE.fullmatch(d.name):  # being published, or its maker died doing so
            if _age_s(d) > YOUNG_S * 12:
                shutil.rmtree(d, ignore_errors=True)
            continue
        if not RID_RE.fullmatch(d.name):
            continue
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
    for rid, entries in sorted(_entries_by_run().items()):
        if ours and (root / rid).exists():  # its run (alive or just made) has its directory
            continue
        owner = run_owner(rid)
        if owner is not None and process_alive(*owner):
            continue
        if owner is None and min(_age_s(p) for p in entries) < YOUNG_S:
            continue
        unlink_entries(rid)
        if rid not in removed:
            removed.append(rid)
    return removed


def _entries_by_run() -> dict[str, list[Path]]:
    found = [p for p in SHM_DIR.glob("*") if p.name.startswith((NAME_PREFIX, "sem." + NAME_PREFIX))]
    if MQUEUE_DIR.is_dir():
        found += list(MQUEUE_DIR.glob(NAME_PREFIX + "*"))
    out: dict[str, list[Path]] = {}
    for p in found:
        parts = p.name.removeprefix("sem.").split(".")
        if len(parts) > 2:
            out.setdefault(parts[1], []).append(p)
    for rid, p in netns.run_namespaces().items():
        out.setdefault(rid, []).append(p)
    return out


def remove_run(cfg: RunConfig) -> None:
    unlink_objects(cfg)
    shutil.rmtree(cfg.rundir, ignore_errors=True)
