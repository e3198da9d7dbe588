"""Which sequence numbers of one datagram stream have come, in memory bounded by a window.

Not part of the replicated system: the bookkeeping of the stress programs (the guest's and
the host's), shared so both ends count the same way.

The most recent ``size`` numbers each keep a slot: when the number entered its path (its
send) and when it came back (0: not yet). Numbers that fall behind the window are folded:
one that came leaves nothing; one that never came joins a run of lost numbers on its path
(path = seq % ``paths``: a flow, FIFO end to end), kept as [first, last, after_ns,
before_ns]: the silence in which whatever lost them did so. The silence begins with the
arrival of the path's last number before the run or, if earlier, when the run's first
number entered the path; it ends with the arrival of the path's first number after it
(0: none yet). A run per loss event, not a number per datagram: a soak of hours stays small.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

WINDOW = 1 << 16
"""Numbers whose arrival can still be told apart one by one: at 50k datagrams/s, the last
1.3 s; a reply later than that to a number counted lost takes it back out of its run."""


class SeqWindow:
    def __init__(self, paths: int = 1, size: int = WINDOW) -> None:
        self.paths = max(1, paths)
        self.size = size
        self.base = 0  # the lowest number not yet folded
        self.top = 0  # one past the highest number entered (or seen)
        self.came = 0  # distinct numbers that came
        self.last_ns = 0  # the latest arrival
        self._arrived = array("q", bytes(8 * size))
        self._entered = array("q", bytes(8 * size))
        self._prev_ns = [0] * self.paths  # per path: the last folded arrival
        self._open: list[list[int] | None] = [None] * self.paths  # per path: the run in progress
        self._runs: list[list[int]] = []  # closed runs

    # -- the stream ---------------------------------------------------------------------------

    def enter(self, seq: int, now_ns: int) -> None:
        """Number ``seq`` (the next one) entered its path at ``now_ns``."""
        self._advance(seq + 1)
        self._entered[seq % self.size] = now_ns

    def arrive(self, seq: int, now_ns: int, grow: bool = False) -> str:
        """Number ``seq`` came at ``now_ns``: "new", "dup" (it had come), or "bad" (a number
        never entered; with ``grow`` a number past the top enters now, unsent ones skipped)."""
        if seq < 0:
            return "bad"
        if seq >= self.top:
            if not grow:
                return "bad"
            self._advance(seq + 1)
        if seq < self.base:
            if not self._take_back(seq, now_ns):
                return "dup"
        else:
            i = seq % self.size
            if self._arrived[i]:
                return "dup"
            self._arrived[i] = now_ns
        self.came += 1
        self.last_ns = max(self.last_ns, now_ns)
        return "new"

    def has(self, seq: int) -> bool:
        """Whether ``seq`` came."""
        if not 0 <= seq < self.top:
            return False
        if seq >= self.base:
            return self._arrived[seq % self.size] != 0
        return not any(r[0] <= seq <= r[1] and (seq - r[0]) % self.paths == 0
                       for r in self._all_open_and_closed())

    def runs(self) -> list[list[int]]:
        """Every run of numbers that never came, as if the whole stream were folded now."""
        prev = list(self._prev_ns)
        open_ = [None if r is None else list(r) for r in self._open]
        out = [list(r) for r in self._runs]
        for seq in range(self.base, self.top):
            self._fold_one(seq, prev, open_, out)
        return out + [r for r in open_ if r is not None]

    # -- folding ------------------------------------------------------------------------------

    def _advance(self, new_top: int) -> None:
        """Make room up to ``new_top``: fold what falls behind the window."""
        if new_top <= self.top:
            return
        keep_from = new_top - self.size
        if keep_from > self.base:
            stop = min(keep_from, self.top)
            for seq in range(self.base, stop):
                self._fold_one(seq, self._prev_ns, self._open, self._runs)
                i = seq % self.size
                self._arrived[i] = self._entered[i] = 0
            if keep_from > self.top:  # numbers never entered (a host stream's skipped ones)
                self._fold_missing(self.top, keep_from)
            self.base = keep_from
        for seq in range(max(self.top, self.base), new_top):
            i = seq % self.size
            self._arrived[i] = self._entered[i] = 0
        self.top = new_top

    def _fold_one(self, seq: int, prev: list[int], open_: list[list[int] | None],
                  out: list[list[int]]) -> None:
        path = seq % self.paths
        i = seq % self.size
        t = self._arrived[i]
        run = open_[path]
        if t:
            if run is not None:
                run[3] = t
                out.append(run)
                open_[path] = None
            prev[path] = t
        elif run is None:
            start = prev[path]
            entered = self._entered[i]
            if start and 0 < entered < start:
                start = entered
            open_[path] = [seq, seq, start, 0]
        else:
            run[1] = seq

    def _fold_missing(self, lo: int, hi: int) -> None:
        """Numbers ``lo`` .. ``hi`` - 1 never came and have no slot: each path's part of them
        joins (or opens) that path's run."""
        for k in range(min(self.paths, hi - lo)):
            first = lo + k
            path = first % self.paths
            last = first + (hi - 1 - first) // self.paths * self.paths
            run = self._open[path]
            if run is None:
                self._open[path] = [first, last, self._prev_ns[path], 0]
            else:
                run[1] = last

    def _all_open_and_closed(self) -> list[list[int]]:
        return self._runs + [r for r in self._open if r is not None]

    def _take_back(self, seq: int, now_ns: int) -> bool:
        """A folded number came after all: split it out of its run. False: it was not in one
        (it had come)."""
        for holder in (self._runs, self._open):
            for k, r in enumerate(holder):
                if r is None or not (r[0] <= seq <= r[1] and (seq - r[0]) % self.paths == 0):
                    continue
                first, last, after, before = r
                parts = []
                if seq > first:
                    parts.append([first, seq - self.paths, after, now_ns])
                tail = [seq + self.paths, last, now_ns, before] if seq < last else None
                if holder is self._open:
                    self._open[k] = tail
                    if tail is None:
                        self._prev_ns[k] = max(self._prev_ns[k], now_ns)
                    self._runs.extend(parts)
                else:
                    self._runs[k:k + 1] = parts + ([tail] if tail else [])
                return True
        return False


class RecentTimes(Sequence[int]):
    """A time per sequence number, appended in order, kept for the last ``size`` numbers
    only (an older number reads 0: not known)."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self._n = 0
        self._ns = array("q", bytes(8 * size))

    def append(self, ns: int) -> None:
        self._ns[self._n % self.size] = ns
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, seq: int) -> int:  # type: ignore[override]
        if not self._n - self.size <= seq < self._n:
            return 0
        return self._ns[seq % self.size]
