"""Shared fixtures: the leftover check every run must pass, and a UDP receiver owned by a test.

``no_leftovers`` snapshots /dev/shm, /dev/mqueue, the run directories, the runs' network
namespaces (``vnr-<rid>``, with their taps) and the replica's processes before a test and
fails the test if anything new is still there after it (with a short grace for processes to
exit).

Other sessions may use this machine at the same time, so a new entry counts when it can be
this test's: a run's object (``vnr.<rid>.``, also as ``sem.vnr.<rid>.``) unless the run
belongs to a live supervisor that is neither this process nor one of its descendants, or
an object of this test process (``vnrtest.<pid>.``, see ringmock). Every new run directory
and replica process counts under the same rule.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from replica import Replica, private_runs_root
from ringmock import TEST_PREFIX

from common.ipc import MQUEUE_DIR, NAME_PREFIX, SHM_DIR, run_owner
from common.ipc import runs_root as all_runs_root
from common.netns import run_namespaces

ROLES = ("guestproc", "kvmproc", "qemuproc")
GRACE_S = 2.0
WATCH_INTERVAL_S = 0.05


def ensure_mqueue_mounted() -> None:
    """Mount the mqueue file system if it is not (as root); fail if queues cannot be listed."""
    if os.path.ismount(MQUEUE_DIR):
        return
    if os.geteuid() == 0:
        subprocess.run(["sh", "-c", f"mountpoint -q {MQUEUE_DIR} || (mkdir -p {MQUEUE_DIR} && "
                        f"mount -t mqueue none {MQUEUE_DIR})"], check=False, capture_output=True)
    if not os.path.ismount(MQUEUE_DIR):
        pytest.fail(f"{MQUEUE_DIR} is not a mounted mqueue file system and could not be mounted "
                    "(needs root): message-queue leftovers cannot be checked", pytrace=False)


def rid_of(entry_name: str) -> str | None:
    """The run id in a run's object name (``vnr.<rid>.x`` or ``sem.vnr.<rid>.x``)."""
    name = entry_name.removeprefix("sem.")
    if not name.startswith(NAME_PREFIX):
        return None
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else None


def replica_processes() -> dict[tuple[int, float], tuple[str, str | None, int]]:
    """(pid, start time) -> (role, run id, parent pid) of every replica process."""
    found = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time", "ppid"]):
        info = p.info
        cmd = info.get("cmdline") or []
        role = info.get("name") if info.get("name") in ROLES else None
        if role is None and len(cmd) >= 3 and cmd[1] == "-m" and cmd[2] in ROLES:
            role = cmd[2]
        if role is None and len(cmd) >= 3 and cmd[1:3] == ["-m", "kvmproc.vhost_worker"]:
            role = "vhost worker"
        if role is None:
            continue
        rid = Path(cmd[-1]).name if cmd and cmd[-1].startswith("/") else None
        found[(info["pid"], info["create_time"])] = (role, rid, info["ppid"])
    return found


def mine(pid: int) -> bool:
    """Is ``pid`` this process or one of its descendants (now)?"""
    if pid == os.getpid():
        return True
    try:
        return os.getpid() in (a.pid for a in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def foreign_pid(pid: int) -> bool:
    """A live process that is neither this one, one of its descendants, nor init."""
    return pid > 1 and psutil.pid_exists(pid) and not mine(pid)


@dataclass
class Snapshot:
    shm: set[str]
    mqueue: set[str]
    rundirs: set[str]
    procs: dict[tuple[int, float], tuple[str, str | None, int]]
    netns: set[str] = field(default_factory=set)  # the run ids of the namespaces

    @classmethod
    def take(cls) -> Snapshot:
        root = all_runs_root()
        return cls(shm={p.name for p in SHM_DIR.iterdir()},
                   mqueue={p.name for p in MQUEUE_DIR.iterdir()},
                   rundirs={p.name for p in root.iterdir()} if root.is_dir() else set(),
                   procs=replica_processes(), netns=set(run_namespaces()))


@dataclass
class RunWatcher:
    """Sorts the runs that appear during a test into this test's and other sessions'.

    ``ours``: every run seen whose supervisor is (or was) this process or a descendant of
    it; ``foreign``: runs of other live supervisors. Directories in ``known`` (there before
    the test) are left out. ``supervisors``: each run seen -> its supervisor's pid (a dead
    run of another session counts as ours; its pid tells it from one a command started).
    """

    known: set[str] = field(default_factory=set)
    foreign: set[str] = field(default_factory=set)
    ours: set[str] = field(default_factory=set)
    supervisors: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="run-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        self.scan()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            self.scan()

    def scan(self) -> None:
        root = all_runs_root()
        for d in root.iterdir() if root.is_dir() else ():
            if d.name in self.known or d.name in self.ours or d.name in self.foreign:
                continue
            self.classify(d.name, d)
        for _, (_, rid, ppid) in replica_processes().items():
            if rid and rid not in self.ours and rid not in self.foreign:
                self.supervisors.setdefault(rid, ppid)
                (self.foreign if foreign_pid(ppid) else self.ours).add(rid)
        for rid in run_namespaces():  # a standalone backend's namespace names its owner
            if rid not in self.ours and rid not in self.foreign:
                owner = run_owner(rid)
                if owner is not None and foreign_pid(owner[0]):
                    self.foreign.add(rid)

    def classify(self, rid: str, rundir: Path) -> None:
        try:
            pid = json.loads((rundir / "config.json").read_text())["supervisor_pid"]
        except (OSError, ValueError, KeyError):
            return
        self.supervisors[rid] = pid
        (self.foreign if foreign_pid(pid) else self.ours).add(rid)


def could_be_ours(entry_name: str, theirs: set[str]) -> bool:
    rid = rid_of(entry_name)
    if rid is not None:
        return rid not in theirs
    return entry_name.removeprefix("sem.").startswith(f"{TEST_PREFIX}{os.getpid()}.")


def leftovers(before: Snapshot, watcher: RunWatcher) -> list[str]:
    """What is new since ``before`` and may be this test's."""
    now = Snapshot.take()
    watcher.scan()
    theirs = watcher.foreign - watcher.ours
    for rid in {rid_of(n) for n in now.shm - before.shm} | (now.netns - before.netns):
        owner = run_owner(rid) if rid and rid not in watcher.ours else None
        if owner is not None and foreign_pid(owner[0]):
            theirs.add(rid)  # a run of another session, starting or ending (its header says)
    found = []
    for where, old, new in (("/dev/shm", before.shm, now.shm),
                            ("/dev/mqueue", before.mqueue, now.mqueue)):
        found += [f"{where}/{n}" for n in sorted(new - old) if could_be_ours(n, theirs)]
    found += [f"{all_runs_root()}/{n}" for n in sorted(now.rundirs - before.rundirs)
              if n not in theirs]
    found += [f"network namespace vnr-{rid}" for rid in sorted(now.netns - before.netns)
              if rid not in theirs]
    for key, (role, rid, ppid) in now.procs.items():
        if key in before.procs or rid in theirs or foreign_pid(ppid):
            continue
        found.append(f"process {role} pid {key[0]} (run {rid}, parent {ppid})")
    return found


@pytest.fixture
def no_leftovers() -> Iterator[RunWatcher]:
    """After the test: no new shm/mqueue entry, run directory or replica process remains.

    Yields the ``RunWatcher``, whose ``ours`` names the runs the test started."""
    ensure_mqueue_mounted()
    before = Snapshot.take()
    watcher = RunWatcher(known=set(before.rundirs))
    watcher.foreign |= {rid for _, rid, _ in before.procs.values() if rid}
    watcher.scan()
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()
    deadline = time.monotonic() + GRACE_S
    left = leftovers(before, watcher)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftovers(before, watcher)
    assert not left, "left behind after the test:\n  " + "\n  ".join(left)


class UdpCollector:
    """A UDP socket on 127.0.0.1 opened by the test; a thread keeps every datagram it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []
        self.peers: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams.append(data)
            self.peers.add(peer)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[bytes]:
        """The datagrams so far, once there are ``n`` or ``timeout`` has passed."""
        deadline = time.monotonic() + timeout
        while len(self.datagrams) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.datagrams)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.sock.close()


@pytest.fixture
def udp_collector() -> Iterator[UdpCollector]:
    c = UdpCollector()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def runs_root() -> Iterator[Path]:
    """A private runs directory for one test module's replicas (see tests/replica.py)."""
    with private_runs_root() as root:
        yield root


@pytest.fixture
def replica(runs_root: Path) -> Iterator[Callable[..., Replica]]:
    """Start replicas with the given options; each is closed after the test."""
    made: list[Replica] = []

    def start(*args: str) -> Replica:
        made.append(Replica(runs_root, *args))
        return made[-1]

    try:
        yield start
    finally:
        for r in made:
            r.close()
