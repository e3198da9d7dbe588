"""Dying processes, leftovers and isolation: kill -9 of each process under load, Ctrl-C, kill -9
of the supervisor, ``vreplica cleanup`` next to a live run, two runs at once, object modes.

Each run is a real ``vreplica run`` in a subprocess, sending to a UDP socket the test opens.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common.ipc import (
    MQUEUE_DIR,
    SHM_DIR,
    RunConfig,
    create_objects,
    object_entries,
    remove_run,
    runs_root,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
ROLES = ("kvm", "qemu", "guest")
LOAD_PACKETS = 150_000  # seconds of sending: the run is under load when a test hits it
SO_RCVBUFFORCE = 33  # Linux: SO_RCVBUF past net.core.rmem_max (CAP_NET_ADMIN)


class HostSocket:
    """A UDP socket on 127.0.0.1 opened by the test; a thread keeps each datagram's sequence
    number and size. Its receive buffer is forced large, so loopback drops nothing."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.seqs: list[int] = []
        self.sizes: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(65536)
        recv_into = self.sock.recv_into
        seqs = self.seqs
        while not self._stop.is_set():
            try:
                n = recv_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return
            seqs.append(int.from_bytes(buf[:8], "big"))
            self.sizes.add(n)

    def wait_for(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while len(self.seqs) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return len(self.seqs)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.sock.close()


@pytest.fixture
def host() -> Iterator[HostSocket]:
    h = HostSocket()
    yield h
    h.close()


def start_run(*args: str, port: int, packets: int = LOAD_PACKETS, size: int = 64,
              umask: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vreplica.cli", "run", "--packets", str(packets), "--size",
           str(size), "--dest-port", str(port), "--timeout", "60", *args]
    if umask is not None:
        cmd = ["sh", "-c", f"umask {umask:03o} && exec \"$0\" \"$@\"", *cmd]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def children_of(p: subprocess.Popen, timeout: float = 10.0) -> dict[str, psutil.Process]:
    """The run's three processes by role, once all have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for c in psutil.Process(p.pid).children():
            try:
                cmd = c.cmdline()
            except psutil.Error:
                continue
            for role in ROLES:
                if f"{role}proc" in cmd:
                    found[role] = c
        if len(found) == 3:
            return found
        time.sleep(0.01)
    raise AssertionError(f"the run's processes did not all start: {sorted(found)}")


def rundir_of(procs: dict[str, psutil.Process]) -> Path:
    return Path(procs["kvm"].cmdline()[-1])


def under_load(p: subprocess.Popen, host: HostSocket,
               packets: int = 2000) -> dict[str, psutil.Process]:
    procs = children_of(p)
    assert host.wait_for(packets, 20.0) >= packets, "no traffic reached the host socket"
    return procs


def finish(p: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


# -- kill -9 of each process under load ----------------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("role", ROLES)
def test_kill9_under_load_stops_the_run(host: HostSocket, role: str) -> None:
    """The supervisor notices, stops the other two, removes every object (no_leftovers), and
    says in one line which process died of what."""
    p = start_run(port=host.port)
    procs = under_load(p, host)
    victim = procs[role]
    victim.send_signal(signal.SIGKILL)
    rc, _, err = finish(p)
    assert rc == 1
    assert re.fullmatch(rf"vreplica: {role} process \(pid {victim.pid}\) died: killed by "
                        r"SIGKILL\n", err), err
    assert len(host.seqs) < LOAD_PACKETS  # the run ended there, not when the program did
    for other in procs.values():
        assert not other.is_running() or other.status() == psutil.STATUS_ZOMBIE


# -- Ctrl-C ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_ctrl_c_under_load_exits_130(host: HostSocket) -> None:
    p = start_run(port=host.port)
    under_load(p, host)
    p.send_signal(signal.SIGINT)
    rc, _, err = finish(p)
    assert rc == 130
    assert err == "vreplica: interrupted\n"
    assert len(host.seqs) < LOAD_PACKETS  # the run ended there, not when the program did


@pytest.mark.timeout(40)
def test_sigterm_under_load_says_who_sent_it(host: HostSocket) -> None:
    """As QEMU's qemu_system_killed: the signal, the sender's pid and its command."""
    p = start_run(port=host.port)
    under_load(p, host)
    p.send_signal(signal.SIGTERM)
    rc, _, err = finish(p)
    me = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
    assert rc == 143
    assert err == f"vreplica: terminating on signal 15 from pid {os.getpid()} ({me})\n"
    assert len(host.seqs) < LOAD_PACKETS


@pytest.mark.timeout(120)
def test_the_hold_line_names_commands_the_user_can_type() -> None:
    """Started as ``./run.sh run --hold``, the run names ``./run.sh attach ...``: typed as
    printed, in the same directory, its quit ends the run."""
    p = subprocess.Popen(["./run.sh", "run", "--packets", "3", "--hold"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()  # type: ignore[union-attr]
        m = re.search(r"attach with '([^']+)'; end it with '([^']+)'", line)
        assert m, line
        attach, end = m.groups()
        assert attach.startswith("./run.sh attach qemu --run ") and end == attach + " -c quit"
        q = subprocess.run(end, shell=True, cwd=REPO, capture_output=True, text=True,
                           timeout=60)
        assert q.returncode == 0, q.stderr
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            p.communicate(timeout=30)
    assert p.returncode == 0


# -- the run's timeout: silence, not total time ----------------------------------------------------


@pytest.mark.timeout(120)
def test_a_run_that_keeps_making_progress_outlives_its_timeout(host: HostSocket) -> None:
    """--timeout 1 gives up after 1 + 15 s without progress; 24 datagrams 800 ms apart take
    longer than that in all, and the run finishes."""
    p = start_run("--pace-ms", "800", "--timeout", "1", port=host.port, packets=24)
    rc, out, err = finish(p, 100)
    assert rc == 0, err
    assert host.wait_for(24, 5.0) == 24
    sending_s = float(re.search(r"([0-9.]+) ms sending", out).group(1)) / 1e3  # type: ignore[union-attr]
    assert sending_s > 16, out  # the run did outlast the silence it is allowed


@pytest.mark.timeout(90)
def test_a_stalled_guest_times_out(host: HostSocket) -> None:
    """A guest that stops (SIGSTOP) reports nothing: the run ends after --timeout + 15 s of
    that silence, in one line."""
    p = start_run("--pace-ms", "100", "--timeout", "1", port=host.port, packets=100_000)
    procs = under_load(p, host, packets=5)
    procs["guest"].suspend()
    rc, _, err = finish(p, 80)
    assert rc == 1
    assert re.fullmatch(r"vreplica: timed out: no progress from the guest for 16 s \(--timeout 1 "
                        r"\+ 15; still running: kvm, qemu, guest\)\n", err), err


def own_run(p: subprocess.Popen) -> str | None:
    """The id of the run ``p`` supervises, once its directory is made."""
    root = runs_root()
    for d in root.iterdir() if root.is_dir() else ():
        try:
            if RunConfig.load(d).supervisor_pid == p.pid:
                return d.name
        except (OSError, ValueError, TypeError):
            continue
    return None


STARTING = {
    "rundir": lambda p: own_run(p) is not None,
    "objects": lambda p: bool((rid := own_run(p)) and object_entries(rid)),
    "a process": lambda p: bool(psutil.Process(p.pid).children()),
}
"""Points in the making of a run, each seen from outside: the run directory, the IPC
objects, the first of the three processes."""


@pytest.mark.timeout(40)
@pytest.mark.parametrize("stage", list(STARTING))
def test_ctrl_c_while_starting_leaves_nothing(host: HostSocket, stage: str) -> None:
    """A Ctrl-C once the run's making has reached ``stage`` (directory, objects,
    processes) still ends in one line, status 130 and no leftovers."""
    p = start_run(port=host.port)
    reached = STARTING[stage]
    deadline = time.monotonic() + 20
    while not reached(p):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, f"the run never reached {stage}"
        time.sleep(0.001)
    p.send_signal(signal.SIGINT)
    rc, _, err = finish(p)
    assert rc == 130, err
    assert err == "vreplica: interrupted\n"


# -- the supervisor killed -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_supervisor_kill9_children_exit_and_remove_the_run(host: HostSocket) -> None:
    """PR_SET_PDEATHSIG: the children get SIGTERM and, finding the supervisor dead, remove
    the run's objects and directory themselves."""
    p = start_run(port=host.port)
    procs = under_load(p, host)
    rundir = rundir_of(procs)
    rid = rundir.name
    assert object_entries(rid)
    p.kill()
    p.wait()
    gone, alive = psutil.wait_procs(list(procs.values()), timeout=5.0)
    assert not alive, f"still running: {alive}"
    deadline = time.monotonic() + 2.0
    while (object_entries(rid) or rundir.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert object_entries(rid) == []
    assert not rundir.exists()
    p.communicate()


def dead_process() -> tuple[int, float]:
    """(pid, start time) of a process that has exited."""
    q = subprocess.Popen(["true"])
    info = psutil.Process(q.pid)
    started = info.create_time()
    q.wait()
    return q.pid, started


def fake_run(root: Path, rid: str, owner: tuple[int, float], with_dir: bool = True) -> RunConfig:
    cfg = RunConfig(rid, str(root / rid), owner[0], owner[1], 1 << 20, 64, 2, 1, {})
    if with_dir:
        (root / rid).mkdir(mode=0o700)
        cfg.save()
    create_objects(cfg)
    return cfg


@pytest.mark.timeout(60)
def test_cleanup_removes_dead_runs_never_a_live_one(host: HostSocket, tmp_path: Path) -> None:
    """``vreplica cleanup`` next to a live run: the dead runs' objects and directories go, the
    live run's stay and it finishes with every packet delivered. Objects without a directory
    here go only if their header names no live supervisor (a run under another root stays)."""
    n = 30_000
    p = start_run(port=host.port, packets=n)
    procs = under_load(p, host, 500)
    live_rid = rundir_of(procs).name
    root = runs_root()
    dead = fake_run(root, os.urandom(8).hex(), dead_process())
    orphan = fake_run(root, os.urandom(8).hex(), dead_process(), with_dir=False)
    elsewhere = fake_run(root, os.urandom(8).hex(), (os.getpid(), psutil.Process().create_time()),
                         with_dir=False)
    before = sorted(e.name for e in object_entries(live_rid))
    try:
        out = subprocess.run([sys.executable, "-m", "vreplica.cli", "cleanup"], cwd=REPO,
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert dead.rid in out.stdout and live_rid not in out.stdout
        assert object_entries(dead.rid) == [] and not Path(dead.rundir).exists()
        assert object_entries(orphan.rid) == []
        assert sorted(e.name for e in object_entries(live_rid)) == before
        assert object_entries(elsewhere.rid), "a live owner's objects were removed"
        rc, _, err = finish(p)
        assert rc == 0, err
        assert host.wait_for(n, 5.0) == n and sorted(set(host.seqs)) == list(range(n))
    finally:
        for cfg in (dead, orphan, elsewhere):
            remove_run(cfg)


# -- isolation and modes -------------------------------------------------------------------------


def inet_sockets(procs: list[psutil.Process]) -> list[tuple[str, str, tuple]]:
    out = []
    for proc in procs:
        for c in proc.net_connections(kind="inet"):
            out.append((proc.name(), c.status, c.laddr))
    return out


@pytest.mark.timeout(40)
def test_objects_private_and_loopback_only(host: HostSocket) -> None:
    """Even with umask 000: objects 0600, run directory and root 0700, a 16-hex-digit run id;
    and no socket of the run's four processes on anything but 127.0.0.1, none listening."""
    p = start_run(port=host.port, umask=0o000)
    procs = under_load(p, host)
    rundir = rundir_of(procs)
    assert re.fullmatch(r"[0-9a-f]{16}", rundir.name)
    assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
    assert stat.S_IMODE(runs_root().stat().st_mode) == 0o700
    entries = object_entries(rundir.name)
    assert {e.parent for e in entries} == {SHM_DIR, MQUEUE_DIR}
    assert len(entries) >= 1 + 1 + 7 + 1 + 2 + 1  # inflight, ram, channels, kick, ...
    for e in entries:
        st = e.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{e}: {oct(st.st_mode)}"
        assert st.st_uid == os.getuid()
    for f in rundir.iterdir():
        assert not stat.S_IMODE(f.lstat().st_mode) & 0o077, f"{f}: {oct(f.lstat().st_mode)}"
    socks = inet_sockets([psutil.Process(p.pid), *procs.values()])
    assert socks, "slirp has no host socket"
    for name, status, laddr in socks:
        assert laddr.ip == "127.0.0.1", (name, status, laddr)
        assert status != psutil.CONN_LISTEN, (name, status, laddr)
    p.send_signal(signal.SIGINT)
    assert finish(p)[0] == 130


@pytest.mark.timeout(60)
def test_two_runs_at_once_each_gets_its_own_packets(host: HostSocket) -> None:
    other = HostSocket()
    try:
        n = 20_000
        a = start_run(port=host.port, packets=n, size=100)
        b = start_run(port=other.port, packets=n, size=200)
        ra, rb = finish(a), finish(b)
        assert ra[0] == 0 and rb[0] == 0, (ra[2], rb[2])
        for sock, size in ((host, 100), (other, 200)):
            assert sock.wait_for(n, 5.0) == n
            assert sorted(sock.seqs) == list(range(n))
            assert sock.sizes == {size}
    finally:
        other.close()


@pytest.mark.timeout(30)
def test_cleanup_command_reports_what_it_removed(tmp_path: Path) -> None:
    dead = fake_run(runs_root(), os.urandom(8).hex(), dead_process())
    out = subprocess.run([sys.executable, "-m", "vreplica.cli", "cleanup"], cwd=REPO,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    assert re.match(r"removed the leftovers of \d+ dead run\(s\)", out.stdout)
    assert dead.rid in out.stdout
    assert object_entries(dead.rid) == [] and not Path(dead.rundir).exists()


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_runs_root_of_another_user_is_refused(tmp_path: Path) -> None:
    """A runs root someone else made (or a symlink) is neither used nor cleaned: one line,
    status 1, and what was in it is still there."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    (theirs / "0123456789abcdef").mkdir()
    os.chown(theirs, 65534, 65534)
    link = tmp_path / "link"
    link.symlink_to(theirs)
    for root in (theirs, link):
        out = subprocess.run([sys.executable, "-m", "vreplica.cli", "run", "--packets", "1"],
                             cwd=REPO, capture_output=True, text=True, timeout=20,
                             env={**os.environ, "VREPLICA_RUNS": str(root)})
        assert out.returncode == 1
        assert re.fullmatch(r"vreplica: cannot set up the run: .*\n", out.stderr), out.stderr
        assert [d.name for d in theirs.iterdir()] == ["0123456789abcdef"]
