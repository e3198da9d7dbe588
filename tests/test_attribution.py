"""The stress verdict's loss accounting on its own: runs of lost sequence numbers, the silence
each was lost in, and the chaos event that silence overlaps."""

from __future__ import annotations

from array import array

import pytest

from common.seqwindow import SeqWindow
from vreplica.stress.attribution import Outage, attribute, begin_at_entry

pytestmark = pytest.mark.timeout(10)


def loss_runs(arrived: array, paths: int, sent: array | None = None) -> list[list[int]]:
    """The stream ``arrived`` (0: never came) through a SeqWindow, each number sent first."""
    w = SeqWindow(paths)
    for seq in range(len(arrived)):
        w.enter(seq, sent[seq] if sent is not None else 0)
    for seq, t in enumerate(arrived):
        if t:
            w.arrive(seq, t)
    return sorted(w.runs())


def test_runs_per_path_with_their_silences() -> None:
    # two paths (flows): 0, 2, 4, ... and 1, 3, 5, ...; 2 and 4 lost on path 0, 7 on path 1
    arrived = array("q", [10, 11, 0, 13, 0, 15, 16, 0, 18])
    assert loss_runs(arrived, 2) == [[2, 4, 10, 16], [7, 7, 15, 0]]


def test_a_reply_seen_after_the_loss_does_not_hide_it() -> None:
    """A killed QEMU wrote 0's reply into the used ring and died before its interrupt; the
    guest saw it only once the new QEMU interrupted (t=500), after 1 and 2 were lost in the
    dead QEMU (sent at t=100 and t=110). The silence starts when 1 was sent."""
    arrived = array("q", [500, 0, 0, 504])
    sent = array("q", [90, 100, 110, 120])
    [run] = loss_runs(arrived, 1, sent)
    assert run == [1, 2, 100, 504]
    kill = Outage("kill-device", 0.1, start_ns=200, end_ns=480)
    assert attribute([run], 1, [kill], now_ns=1000) == (2, 2, [])
    assert kill.lost == 2
    # measured from the reply's arrival alone the restart would not explain the loss
    late = Outage("kill-device", 0.1, start_ns=200, end_ns=480)
    assert attribute([[1, 2, 500, 504]], 1, [late], now_ns=1000) == (2, 0, [[1, 2, 500, 504]])


def test_host_sends_start_the_inbound_silence() -> None:
    runs = [[5, 9, 700, 900], [12, 12, 0, 950]]
    begin_at_entry(runs, array("q", range(0, 1300, 100)))
    assert runs == [[5, 9, 500, 900], [12, 12, 0, 950]]  # a run with no number before stays


def test_a_pause_explains_nothing() -> None:
    pause = Outage("guest-pause", 0.1, start_ns=0, end_ns=10_000)
    assert attribute([[3, 3, 100, 200]], 1, [pause], now_ns=10_000) == (1, 0, [[3, 3, 100, 200]])
