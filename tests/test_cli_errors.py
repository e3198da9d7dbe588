"""Bad ``vreplica run`` options: one line on stderr naming the option, exit status 2, and
nothing made (no IPC object, no run directory, no process)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import vreplica.cli as cli

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
    (["--poll-us", "-1"], "--poll-us"),
    (["--no-such-flag"], "--no-such-flag"),
]


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "run", *args, "--timeout", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


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
    no_leftovers.scan()
    assert not no_leftovers.ours, f"runs started: {sorted(no_leftovers.ours)}"


@pytest.mark.timeout(60)
def test_mem_error_names_a_size_that_is_enough(no_leftovers: RunWatcher) -> None:
    """The minimum the --mem error message names is itself accepted."""
    proc = run_cli(["--mem", "1M"])
    assert proc.returncode == 2
    m = re.search(r"needs at least (\d+) MiB", proc.stderr)
    assert m is not None, proc.stderr
    stated = f"{m.group(1)}M"
    cli.options_from_args(cli.build_parser().parse_args(["run", "--mem", stated]))
