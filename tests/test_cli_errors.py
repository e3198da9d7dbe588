"""Bad ``vreplica run`` options: one line on stderr naming the option, exit status 2, and
nothing made (no IPC object, no run directory, no process)."""

from __future__ import annotations

import argparse
import ast
import ctypes
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import vreplica.cli as cli
from vreplica.run import options

if TYPE_CHECKING:
    from conftest import RunWatcher

REPO = Path(__file__).resolve().parent.parent

BAD_OPTIONS = [
    (["--size", "3"], "--size"),
    (["--size", "2000"], "--size"),
    (["--queue-size", "100"], "--queue-size"),
    (["--queue-size", "65536"], "--queue-size"),
    (["--dest-port", "70000"], "--dest-port"),
    (["--mem", "1M"], "--mem"),
    (["--vectors", "-1"], "--vectors"),
    (["--ioeventfd", "maybe"], "--ioeventfd"),
    (["--tx", "bogus"], "--tx"),
    (["--trace-events", "virtqueue_pop"], "--trace-events"),
    (["--trace", "/tmp/vnr-never-written.json", "--trace-events", "no_such_event"],
     "'no_such_event'"),
    (["--trace", "/tmp/vnr-never-written.json", "--trace-events", "virtqueue_pop,nosuch*"],
     "'nosuch*'"),
    (["--trace", "/tmp/vnr-never-written.json", "--trace-events", ","], "--trace-events"),
    (["--poll-us", "-1"], "--poll-us"),
    (["--timeout", "nan"], "--timeout"),
    (["--trace", "/tmp/vnr-never-written.x", "--pcap", "/tmp/../tmp/vnr-never-written.x"],
     "--pcap"),
    (["--pace-ms", "inf"], "--pace-ms"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--ring", "packed"], "--ring packed"),
    (["--ring", "ring"], "--ring"),
    (["-device", "virtio-net-pci,packed=on"], "--ring packed"),
    (["--transport", "modern", "--guest-fault", "packed-loop", "--packets", "8"], "--ring packed"),
    (["--transport", "modern", "--ring", "packed", "--guest-fault", "loop", "--packets", "8"],
     "--ring split"),
    (["--transport", "pci"], "--transport"),
    (["--transport", "modern", "--guest-fault", "queue-pfn", "--packets", "10"], "queue-pfn"),
    (["--transport", "legacy", "--guest-fault", "queue-addr", "--packets", "10"],
     "queue-addr"),
]


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return vreplica(["run", *args, "--timeout", "20"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "option"), BAD_OPTIONS,
                         ids=["_".join(a).lstrip("-") for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_status_2_and_makes_nothing(
        args: list[str], option: str, no_leftovers: RunWatcher) -> None:
    """The option is refused before anything exists: exactly one stderr line, which names it,
    nothing on stdout, exit status 2, and no run of this test ever appeared."""
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vreplica: ")
    assert option in lines[0]
    assert proc.stdout == ""
    assert not started_by(no_leftovers, proc.pid), "the command started a run"  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_mem_error_names_a_size_that_is_enough(no_leftovers: RunWatcher) -> None:
    """The minimum the --mem error message names is itself accepted."""
    proc = run_cli(["--mem", "1M"])
    assert proc.returncode == 2
    m = re.search(r"needs at least (\d+) MiB", proc.stderr)
    assert m is not None, proc.stderr
    stated = f"{m.group(1)}M"
    options.options_from_args(cli.build_parser().parse_args(["run", "--mem", stated]))


# -- paths and ports, checked before anything starts ---------------------------------------------

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def without_dac_override() -> None:
    """In the child before exec: as root, give up the capabilities that override file
    modes, so that a directory without write permission is one for the command too."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def vreplica(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``vreplica ARGS``; the result's ``pid`` is the command's process id."""
    with subprocess.Popen([sys.executable, "-m", "vreplica.cli", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=without_dac_override) as p:
        out, err = p.communicate(timeout=60)
    done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    done.pid = p.pid  # type: ignore[attr-defined]
    return done


def started_by(watcher: RunWatcher, pid: int) -> list[str]:
    """The runs seen during the test whose supervisor was process ``pid``."""
    watcher.scan()
    return sorted(rid for rid, sup in watcher.supervisors.items() if sup == pid)


@pytest.fixture
def places(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A directory that does not exist, a directory, and one the command may not write."""
    ro = tmp_path / "read-only"
    ro.mkdir(mode=0o555)
    (tmp_path / "a-directory.svg").mkdir()
    yield {"missing": tmp_path / "no-such-dir", "directory": tmp_path / "a-directory.svg",
           "unwritable": ro}
    ro.chmod(0o700)


def assert_refused(proc: subprocess.CompletedProcess[str], label: str, option: str,
                   watcher: RunWatcher) -> None:
    """One stderr line naming ``label`` and ``option``, status 2, no run started."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{label}: ") and option in lines[0], lines[0]
    assert not started_by(watcher, proc.pid), "the command started a run"  # type: ignore[attr-defined]


OUTPUTS = [
    (["run", "--trace", "{out}"], "vreplica", "--trace"),
    (["run", "--pcap", "{out}"], "vreplica", "--pcap"),
    (["run", "--summary-json", "{out}"], "vreplica", "--summary-json"),
    (["stress", "--duration", "1", "--json", "{out}"], "vreplica stress", "--json"),
    (["bench", "--quick", "--json", "{out}"], "vreplica bench", "--json"),
    (["trace", "render", "{trace}", "{out}"], "vreplica trace render", "OUT"),
]
WHERE = {"missing": ("no-such-dir/x.svg", "no such directory"),
         "directory": ("", "Is a directory"),
         "unwritable": ("x.svg", "Permission denied")}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize(("args", "label", "option"), OUTPUTS,
                         ids=[f"{a[0]}_{o.lstrip('-')}" for a, _, o in OUTPUTS])
def test_output_path_refused_before_anything_starts(
        args: list[str], label: str, option: str, where: str, places: dict[str, Path],
        tmp_path: Path, no_leftovers: RunWatcher) -> None:
    """A file a command writes at its end, in a missing directory, that is a directory, or
    in a directory it may not write: one line with the option and the reason, status 2, no
    run, and nothing made where the file would have gone."""
    tail, reason = WHERE[where]
    base = {"missing": tmp_path, "directory": places["directory"],
            "unwritable": places["unwritable"]}[where]
    out = base / tail if tail else base
    trace = tmp_path / "trace.json"
    trace.write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    proc = vreplica([a.format(out=out, trace=trace) for a in args])
    assert_refused(proc, label, option, no_leftovers)
    assert reason in proc.stderr and str(out) in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_demo_out_refused_before_anything_starts(where: str, places: dict[str, Path],
                                                 tmp_path: Path,
                                                 no_leftovers: RunWatcher) -> None:
    """``demo --out DIR`` that is a file, or under a directory it may not write."""
    out = tmp_path / "a-file" if where == "file" else places["unwritable"] / "out"
    if where == "file":
        out.write_text("")
    before = sorted(tmp_path.rglob("*"))
    proc = vreplica(["demo", "--out", str(out)])
    assert_refused(proc, "vreplica demo", "--out", no_leftovers)
    assert ("Not a directory" if where == "file" else "Permission denied") in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.timeout(60)
def test_hostfwd_port_in_use_refused_before_anything_starts(no_leftovers: RunWatcher) -> None:
    """The host port of --hostfwd is held by a socket of the test: refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        proc = vreplica(["run", "--mode", "sink", "--hostfwd", f"udp::{port}-:7000",
                         "--packets", "5"])
    assert_refused(proc, "vreplica", "--hostfwd", no_leftovers)
    assert str(port) in proc.stderr and "in use" in proc.stderr


OTHER_COMMANDS = [
    (["fuzz", "--bogus"], "vreplica fuzz", "--bogus"),
    (["fuzz", "--examples", "0"], "vreplica fuzz", "--examples"),
    (["stress", "--duration", "1", "--chaos-period", "-1"], "vreplica stress", "--chaos-period"),
    (["stress", "--duration", "nan"], "vreplica stress", "--duration"),
    (["stress", "--duration", "1", "--chaos", "bogus"], "vreplica stress", "--chaos"),
    (["demo", "--pace-ms", "nan"], "vreplica demo", "--pace-ms"),
    (["demo", "--packets", "0"], "vreplica demo", "--packets"),
    (["bench", "--bogus"], "vreplica bench", "--bogus"),
    (["trace", "render", "t.json", "o.svg", "--window", "1", "nan"], "vreplica trace render",
     "--window"),
    (["attach", "nosuch"], "vreplica attach", "role"),
    (["ps", "--bogus"], "vreplica ps", "--bogus"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "label", "option"), OTHER_COMMANDS,
                         ids=["_".join(a[:2]).replace("-", "") for a, _, _ in OTHER_COMMANDS])
def test_other_commands_refuse_bad_input_in_one_line(
        args: list[str], label: str, option: str, no_leftovers: RunWatcher) -> None:
    """Every command's bad input: one line naming the command and the option, status 2,
    nothing started."""
    proc = vreplica(args)
    assert_refused(proc, label, option, no_leftovers)
    assert proc.stdout == ""


@pytest.mark.timeout(60)
def test_trace_render_help_exits_0() -> None:
    proc = vreplica(["trace", "render", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: vreplica trace render")
    assert "--packet" in proc.stdout and "--window" in proc.stdout
    assert proc.stderr == ""


def help_entries(text: str) -> dict[str, str]:
    """``--help``'s options, each with its whole help text (joined over its lines)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def help_parsers() -> dict[str, Any]:
    from vreplica.demo import _parser as demo_parser
    from vreplica.stress.stress import build_parser as stress_parser

    run = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices["run"]
    return {"run": run, "stress": stress_parser(), "demo": demo_parser()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["run", "stress", "demo"])
def test_help_gives_every_options_default(command: str) -> None:
    """Each option that has a default says it in --help (on|off options as on or off)."""
    proc = vreplica([command, "--help"])
    assert proc.returncode == 0, proc.stderr
    entries = help_entries(proc.stdout)
    checked = 0
    for action in help_parsers()[command]._actions:
        d = action.default
        if (not action.option_strings or d in (None, "", False) or d is argparse.SUPPRESS
                or action.help is argparse.SUPPRESS):
            continue
        shown = ("on" if d else "off") if isinstance(d, bool) else str(d)
        entry = entries[action.option_strings[0]]
        assert f"(default: {shown})" in entry, entry
        checked += 1
    assert checked >= 5
    if command == "run":
        assert "seconds without progress" in entries["--timeout"]


# -- --trace-events help: every event, by process, from the code --------------------------------

PACKAGES = {"guest": "guestproc", "kvm": "kvmproc", "qemu": "qemuproc"}


def declared_in_source(package: str) -> set[str]:
    """The names of the ``trace_event("NAME")`` calls in a package's source, read with ast
    (an account of the code independent of the registry the CLI reads)."""
    names = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "trace_event"):
                [arg] = node.args
                assert isinstance(arg, ast.Constant), f"{path}: a trace event without a name"
                names.add(arg.value)
    return names


def parse_help(text: str) -> dict[str, set[str]]:
    listed: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("  "):
            assert section is not None
            listed[section].add(line.strip())
        elif line.endswith(":"):
            section = line.split()[0]
            listed[section] = set()
    return listed


@pytest.mark.timeout(60)
def test_trace_events_help_lists_every_event_by_process() -> None:
    """``--trace-events help`` lists, under each process, exactly the trace points that
    process's source declares, and nothing else; exit 0, no run needed."""
    proc = vreplica(["run", "--trace-events", "help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    listed = parse_help(proc.stdout)
    assert set(PACKAGES) <= set(listed)
    for role, package in PACKAGES.items():
        assert listed[role] == declared_in_source(package), role
    assert listed.get("common", set()) == declared_in_source("common")
    assert any(line.startswith("spans") for line in proc.stdout.splitlines())


@pytest.mark.timeout(60)
def test_every_listed_event_is_accepted_as_a_pattern() -> None:
    """Each name ``help`` lists, alone and as a glob, passes the check that refuses
    patterns matching nothing."""
    listed = parse_help(vreplica(["run", "--trace-events", "help"]).stdout)
    names = sorted(set().union(*listed.values()))
    assert names
    for name in names:
        options.check_trace_events(name)
        options.check_trace_events(name[:-1] + "?")
    options.check_trace_events(",".join(names) + ",spans")
    with pytest.raises(options.UsageError, match="no trace event"):
        options.check_trace_events(names[0] + "_not")
