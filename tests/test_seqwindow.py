"""The stress programs' sequence bookkeeping (common.seqwindow): the same runs of lost numbers
as a count over the whole stream, in memory that stays bounded however long the stream."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from common.seqwindow import RecentTimes, SeqWindow

pytestmark = pytest.mark.timeout(60)


def whole_stream_runs(arrived: list[int], sent: list[int], paths: int) -> list[list[int]]:
    """Runs of never-arrived numbers per path, over the whole stream at once."""
    runs = []
    for path in range(paths):
        prev = 0
        run = None
        for seq in range(path, len(arrived), paths):
            t = arrived[seq]
            if t:
                if run is not None:
                    run[3] = t
                    runs.append(run)
                    run = None
                prev = t
            elif run is None:
                start = sent[seq] if prev and 0 < sent[seq] < prev else prev
                run = [seq, seq, start, 0]
            else:
                run[1] = seq
        if run is not None:
            runs.append(run)
    return sorted(runs)


@pytest.mark.parametrize("seed", range(6))
def test_folded_runs_are_the_whole_streams(seed: int) -> None:
    """Numbers sent in order, replies reordered a little and some lost in bursts, through a
    window far smaller than the stream: the same runs and the same silences."""
    rng = random.Random(seed)
    paths = rng.choice((1, 2, 4))
    n = 3000
    sent = [1000 + 10 * s for s in range(n)]
    arrived = [0 if rng.random() < 0.02 else 1005 + 10 * s + rng.randrange(40)
               for s in range(n)]
    for _ in range(5):  # bursts, as a restart loses
        a = rng.randrange(n)
        for s in range(a, min(n, a + rng.randrange(200))):
            arrived[s] = 0
    w = SeqWindow(paths, size=64)
    events = sorted((t, s) for s, t in enumerate(arrived) if t)
    k = 0
    for s in range(n):  # each reply is taken once the sender has passed its arrival time
        while k < len(events) and events[k][0] <= sent[s]:
            assert w.arrive(events[k][1], events[k][0]) == "new"
            k += 1
        w.enter(s, sent[s])
    for t, s in events[k:]:
        assert w.arrive(s, t) == "new"
    assert sorted(w.runs()) == whole_stream_runs(arrived, sent, paths)
    assert w.came == sum(1 for t in arrived if t)
    assert all(w.has(s) == bool(arrived[s]) for s in range(n))


def test_duplicates_and_strays() -> None:
    w = SeqWindow(1, size=8)
    for s in range(20):
        w.enter(s, 100 + s)
    assert w.arrive(19, 200) == "new"
    assert w.arrive(19, 201) == "dup"
    assert w.arrive(20, 202) == "bad"  # never sent
    assert w.arrive(3, 203) == "new"  # folded as lost: a late reply takes it back out
    assert w.arrive(3, 204) == "dup"
    assert sorted(w.runs()) == [[0, 2, 0, 203], [4, 18, 203, 200]]


def test_a_host_stream_grows_with_what_comes() -> None:
    """The guest's count of the host's inbound stream: it learns the top from arrivals, and
    numbers skipped past the window fold into one run."""
    w = SeqWindow(1, size=8)
    assert w.arrive(0, 10, grow=True) == "new"
    assert w.arrive(1, 11, grow=True) == "new"
    assert w.arrive(100, 50, grow=True) == "new"
    assert w.arrive(101, 51, grow=True) == "new"
    assert w.runs() == [[2, 99, 11, 50]]
    assert (w.top, w.came, w.last_ns) == (102, 4, 51)


def test_memory_stays_bounded() -> None:
    """A million datagrams with a loss every thousand: what the window holds does not grow
    with the stream (what grows is a run per loss event)."""
    w = SeqWindow(4)
    tracemalloc.start()
    try:
        for s in range(50_000):
            w.enter(s, s + 1)
            w.arrive(s, s + 2)
        after_50k, _ = tracemalloc.get_traced_memory()
        for s in range(50_000, 1_000_000):
            w.enter(s, s + 1)
            if s % 100_000:
                w.arrive(s, s + 2)
        after_1m, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(w.runs()) == 9
    assert after_1m - after_50k < 100_000, (after_50k, after_1m)


def test_recent_times() -> None:
    r = RecentTimes(size=4)
    for s in range(10):
        r.append(1000 + s)
    assert len(r) == 10
    assert [r[s] for s in range(12)] == [0] * 6 + [1006, 1007, 1008, 1009, 0, 0]
