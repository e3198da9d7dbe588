"""--hold and --wait-attach announce the run at once, in one line on stderr: its id, how to
attach and how to end it; and what the line says works."""

from __future__ import annotations

import os
import re
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.ipc import RunConfig
from common.monitor import query

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
ANNOUNCE_RE = re.compile(r"vreplica: run (?P<rid>[0-9a-f]+) (?P<what>.*?): (?P<how>.*); "
                         r"end it with '(?P<end>[^']+)' or Ctrl-C")


@pytest.fixture
def runs_root() -> Iterator[Path]:
    """A runs root of the test's own, so its run is the only one there."""
    root = Path(tempfile.mkdtemp(prefix="vra-", dir="/tmp"))
    yield root
    left = list(root.iterdir())
    root.rmdir() if not left else None
    assert not left, f"left in the runs root: {left}"


def start(root: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, VREPLICA_RUNS=str(root))
    env.pop("VREPLICA_PROG", None)  # started as vreplica itself, not through run.sh
    return subprocess.Popen([sys.executable, "-m", "vreplica.cli", "run", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def first_stderr_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line the run writes on stderr, read while it runs."""
    assert proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        assert sel.select(timeout), "nothing on stderr"
    return proc.stderr.readline()


def as_command(text: str) -> list[str]:
    """A ``vreplica ...`` command line from the announcement, run with this interpreter."""
    words = shlex.split(text)
    assert words[0] == "vreplica"
    return [sys.executable, "-m", "vreplica.cli", *words[1:]]


def end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


@pytest.mark.timeout(90)
def test_hold_announces_the_run_and_its_quit_ends_it(runs_root: Path) -> None:
    """The line comes while the run is up (a --hold run never ends by itself) and its
    monitors answer, names the run that is there, and the command it gives to end the run
    ends it, cleanly."""
    proc = start(runs_root, "--hold", "--packets", "5")
    try:
        line = first_stderr_line(proc, 30)
        assert proc.poll() is None
        m = ANNOUNCE_RE.fullmatch(line.rstrip("\n"))
        assert m is not None, line
        rid = m["rid"]
        assert RunConfig.load(runs_root / rid).supervisor_pid == proc.pid
        assert "--hold" in m["what"]
        assert f"--run {rid}" in m["how"] and f"--run {rid}" in m["end"]
        deadline = time.monotonic() + 30
        while query(runs_root / rid, "guest", "info status")["program"] != "done":
            assert time.monotonic() < deadline, "the guest program did not finish"
            assert proc.poll() is None
            time.sleep(0.05)
        env = dict(os.environ, VREPLICA_RUNS=str(runs_root))
        r = subprocess.run(as_command(m["end"]), env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.startswith(f"run {rid}:")
        assert err == ""
    finally:
        end(proc)


@pytest.mark.timeout(90)
def test_wait_attach_announces_the_run_and_its_cont_starts_it(runs_root: Path) -> None:
    """With --wait-attach the line comes while the vCPU is held before its first
    instruction; the cont it gives starts the guest, whose program then runs to its end."""
    proc = start(runs_root, "--wait-attach", "--packets", "5")
    try:
        line = first_stderr_line(proc, 30)
        m = ANNOUNCE_RE.fullmatch(line.rstrip("\n"))
        assert m is not None, line
        rid = m["rid"]
        assert "--wait-attach" in m["what"] and "cont" in m["how"]
        env = dict(os.environ, VREPLICA_RUNS=str(runs_root))
        assert query(runs_root / rid, "qemu", "info status")["status"] == "prelaunch"
        assert query(runs_root / rid, "guest", "info status")["vm_exits"] == 0
        cont = re.search(r"run '([^']+ -c cont)'", m["how"])
        assert cont is not None, m["how"]
        r = subprocess.run(as_command(cont[1]), env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.startswith(f"run {rid}:") and err == ""
    finally:
        end(proc)


@pytest.mark.timeout(90)
def test_quit_before_cont_ends_the_run_with_status_0(runs_root: Path) -> None:
    """The announced way to end a run, taken before the guest ever ran: QEMU's quit exits 0,
    and so does the run, with one line saying it has no summary."""
    proc = start(runs_root, "--wait-attach", "--packets", "5")
    try:
        m = ANNOUNCE_RE.fullmatch(first_stderr_line(proc, 30).rstrip("\n"))
        assert m is not None
        env = dict(os.environ, VREPLICA_RUNS=str(runs_root))
        r = subprocess.run(as_command(m["end"]), env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out == ""
        assert err.splitlines() == ["vreplica: ended by the monitor's quit before the "
                                    "guest's program finished: no summary"]
    finally:
        end(proc)
