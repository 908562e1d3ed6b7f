"""A window with a gap in the prediction log is never passed: a stale log makes the analysis inconclusive, a gap
inside the window restarts the evidence after it. The threshold is a claim about Poisson traffic, simulated here;
the analysis runs over real log files written by the gateway's own Parquet writer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from monitoring.rollout.analysis import CONTINUITY, GAP_FALSE_ALARM, analyse, log_continuity, max_silence_s
from monitoring.rollout.spec import fast_spec
from monitoring.rollout.verdicts import combine_verdicts
from tests.support import write_canary_log

THRESHOLD = 0.5
FLUSH_S = 1.0


def poisson_times(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    count = rng.poisson(rate * (end - start))
    return np.sort(rng.uniform(start, end, count))


def test_poisson_traffic_alone_is_never_taken_for_a_gap_or_a_stale_log() -> None:
    """2,000 windows of 30 s at 20-400 requests/s, the newest second not yet flushed: the bound allows a false
    alarm with probability 1e-6 per window, so none is expected (P(any) <= 0.002)."""
    rng = np.random.default_rng(7)
    alarms = 0
    for _ in range(2_000):
        rate = float(rng.uniform(20, 400))
        flushed_until = 30.0 - float(rng.uniform(0, FLUSH_S))
        continuity = log_continuity(poisson_times(rng, rate, 0.0, flushed_until), 0.0, 30.0, FLUSH_S)
        alarms += continuity.found
    assert alarms == 0
    assert GAP_FALSE_ALARM * 2_000 < 0.01


def test_a_three_second_gap_is_found_and_the_evidence_restarts_after_it() -> None:
    rng = np.random.default_rng(8)
    for _ in range(300):
        rate = float(rng.uniform(50, 400))
        before = poisson_times(rng, rate, 0.0, 10.0)
        after = poisson_times(rng, rate, 13.0, 30.0)
        continuity = log_continuity(np.concatenate([before, after]), 0.0, 30.0, FLUSH_S)
        assert not continuity.stale
        assert continuity.gap_s >= 3.0
        assert continuity.evidence_from == after[0]


def test_a_log_that_stopped_is_stale() -> None:
    rng = np.random.default_rng(9)
    times = poisson_times(rng, 200, 0.0, 20.0)  # the gateway hung at t=20
    assert not log_continuity(times, 0.0, 21.0, FLUSH_S).stale  # within the flush lag
    assert not log_continuity(times, 0.0, 23.0, FLUSH_S).stale  # a stall of the flush, not yet a stale log
    stale = log_continuity(times, 0.0, 26.0, FLUSH_S)
    assert stale.stale and stale.stale_s >= 6.0


def test_the_silence_bound_follows_the_rate_and_says_nothing_on_too_few_rows() -> None:
    assert max_silence_s(10, 1.0) == float("inf")
    slow, fast = max_silence_s(1_000, 1_000.0), max_silence_s(1_000, 5.0)  # 1/s and 200/s
    assert slow > 20 and fast == 2.5  # at 200/s only the floor is left
    assert abs(slow - np.log(1_000 / GAP_FALSE_ALARM) / (999 / 1_000.0)) < 1e-9


# --- the analysis over real log files --------------------------------------------------------------------------


def test_an_identical_challenger_is_not_passed_on_a_stale_log(tmp_path: Path) -> None:
    now = time.time()
    times = poisson_times(np.random.default_rng(1), 300, now - 20, now - 8)  # the log stopped 8 s ago
    write_canary_log(tmp_path, times)
    result = analyse(fast_spec(), "canary", 1, tmp_path, now - 20, at=now, threshold=THRESHOLD, flush_s=FLUSH_S)
    assert result.verdicts[CONTINUITY] == "inconclusive"
    assert result.verdicts["error-rate"] == "pass"  # the guardrail alone would have passed it
    assert combine_verdicts(result.verdicts.values()) == "inconclusive"
    assert "stale" in result.values[CONTINUITY]["detail"]


def test_a_failing_challenger_still_fails_on_a_stale_log(tmp_path: Path) -> None:
    now = time.time()
    times = poisson_times(np.random.default_rng(2), 300, now - 20, now - 8)
    write_canary_log(tmp_path, times, challenger_error_rate=0.3)
    result = analyse(fast_spec(), "canary", 1, tmp_path, now - 20, at=now, threshold=THRESHOLD, flush_s=FLUSH_S)
    assert result.verdicts["error-rate"] == "fail"
    assert combine_verdicts(result.verdicts.values()) == "fail"


def test_a_gap_inside_the_window_restarts_the_evidence(tmp_path: Path) -> None:
    now = time.time()
    rng = np.random.default_rng(3)
    before, after = poisson_times(rng, 300, now - 30, now - 15), poisson_times(rng, 300, now - 10, now - 0.5)
    write_canary_log(tmp_path, np.concatenate([before, after]))
    result = analyse(fast_spec(), "canary", 1, tmp_path, now - 30, at=now, threshold=THRESHOLD, flush_s=FLUSH_S)
    assert result.verdicts[CONTINUITY] == "pass"
    assert result.values[CONTINUITY]["value"] >= 5.0
    assert result.samples <= len(after) // 2 + 1  # only challenger rows after the gap are counted


def test_a_continuous_log_adds_no_continuity_verdict(tmp_path: Path) -> None:
    now = time.time()
    write_canary_log(tmp_path, poisson_times(np.random.default_rng(4), 300, now - 20, now - 0.5))
    result = analyse(fast_spec(), "canary", 1, tmp_path, now - 20, at=now, threshold=THRESHOLD, flush_s=FLUSH_S)
    assert CONTINUITY not in result.verdicts
    assert result.verdicts["error-rate"] == "pass"
