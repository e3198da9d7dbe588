"""How the benchmark's tables print a figure."""

from __future__ import annotations

from typing import Any


def fmt_f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def fmt_spread(d: dict[str, Any], key: str) -> str:
    """A median with the trials' range: ``51,541 (45,002-80,311)``."""
    lo, hi = d.get(f"{key}_min"), d.get(f"{key}_max")
    if lo is None or hi is None:
        return fmt_f(d.get(key))
    return f"{fmt_f(d.get(key))} ({fmt_f(lo)}-{fmt_f(hi)})"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]
