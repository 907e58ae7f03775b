"""Latency statistics: pure functions over per-run timings in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    if not sorted_ms:
        raise ValueError("no timings")
    pos = (len(sorted_ms) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p95/p99, mean, std (population) and min of a list of timings."""
    s = sorted(ms)
    n = len(s)
    mean = sum(s) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / n)
    return {
        "p50": percentile(s, 50), "p90": percentile(s, 90), "p95": percentile(s, 95),
        "p99": percentile(s, 99), "mean": mean, "std": std, "min": s[0],
    }


def median_ratio(a_ms: Sequence[float], b_ms: Sequence[float]) -> float:
    """Median of pairwise ratios a_i / b_i of interleaved runs: robust to machine noise that
    hits both variants alike."""
    if len(a_ms) != len(b_ms) or not a_ms:
        raise ValueError("interleaved timings must be paired")
    ratios = sorted(a / b for a, b in zip(a_ms, b_ms, strict=False) if b > 0)
    return percentile(ratios, 50)


def fmt_ms(ms: float | None) -> str:
    """A time for people to read, with its unit, to three significant figures: `4.52 µs`,
    `0.0452 ms`, `45.2 ms`, `1234 ms`. Stored timings keep full precision; only display
    rounds, and never to fixed decimals (a 4 µs model would read `0.005 ms`)."""
    if ms is None or not math.isfinite(ms):
        return "-"
    if ms == 0:
        return "0 ms"
    if abs(ms) < 0.01:
        return f"{_sig3(ms * 1000)} µs"
    return f"{_sig3(ms)} ms"


def _sig3(v: float) -> str:
    decimals = max(0, 2 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    # 9.996 rounds up to 10.00: one decimal too many, so round again at the new magnitude.
    if decimals and abs(float(text)) >= 10 ** (3 - decimals):
        text = f"{v:.{decimals - 1}f}"
    return text
