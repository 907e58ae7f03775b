from __future__ import annotations

import numpy as np
import pytest

from compresskit.ops.latency import fmt_ms, median_ratio, percentile, summarize


def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    ms = rng.gamma(2.0, 1.0, size=257).tolist()
    stats = summarize(ms)
    for q in (50, 90, 95, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(ms, q))
    assert stats["mean"] == pytest.approx(np.mean(ms))
    assert stats["std"] == pytest.approx(np.std(ms))
    assert stats["min"] == min(ms)


def test_percentile_edges():
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_median_ratio_ignores_noise_common_to_both():
    noise = [1.0, 5.0, 1.0, 9.0, 1.0]
    slow = [2.0 * n for n in noise]
    assert median_ratio(slow, noise) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize(("ms", "shown"), [
    (0.0045231, "4.52 µs"), (0.0452, "0.0452 ms"), (45.249, "45.2 ms"), (0.5, "0.500 ms"),
    (9.996, "10.0 ms"), (0.009996, "10.0 µs"), (1234.5, "1234 ms"), (0.0, "0 ms"),
    (None, "-"), (float("nan"), "-")])
def test_times_are_shown_to_three_significant_figures(ms, shown):
    assert fmt_ms(ms) == shown
