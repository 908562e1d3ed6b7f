"""One analysis run: read a window of the prediction log and the labels, run the guardrails, and turn
their results into the `AnalysisResult` the controller's state machine consumes.

The prediction log is a data contract (Parquet files written by the gateway), not a service: the
controller reads the files; it never imports the gateway. Files are skipped by modification time
when they cannot hold rows of the window, so an analysis costs the window, not the whole history.

A window with a gap in the log is never passed (`log_continuity`): rows the log lacks (a gateway that was
killed or hung, batches it could not write) are evidence nobody can judge. The newest rows lagging behind the
analysis time (a stale log: the gateway hung now) make the analysis inconclusive, whatever the guardrails
say (a guardrail's fail still counts: the rows that are there show the harm); a gap inside the window
restarts it after the gap, so the phase passes only on evidence gathered since.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.prediction_log import (
    MODEL_VERSION,
    REQUEST_ID,
    SHADOW_MODEL_VERSION,
    SHADOW_STATUS,
    STATUS,
    TS,
    VARIANT,
    read_feedback,
    read_window,
    served_times,
    without_degraded,
    without_forced,
)
from monitoring.rollout import prometheus_guardrail
from monitoring.rollout.guardrails import GuardrailResult, evaluate_guardrails
from monitoring.rollout.prometheus_guardrail import PrometheusClient
from monitoring.rollout.spec import RolloutSpec
from monitoring.rollout.state_machine import AnalysisResult
from monitoring.rollout.verdicts import Verdict


def rows_of_versions(predictions: pd.DataFrame, versions: dict[str, str]) -> pd.DataFrame:
    """Only what the rollout's own versions answered (`versions`: variant -> model version).

    A slot that failed to load the challenger keeps serving what it had, and a slot restarted mid-rollout
    answers with whatever it loaded: such rows must never be judged as the challenger's (or the champion's).
    Rows without a version (errors, fallbacks: the challenger failed) stay; shadow answers from another
    version are marked `other_version`, which the guardrails and the sample count leave out."""
    if predictions.empty:
        return predictions
    version = predictions[MODEL_VERSION]
    expected = predictions[VARIANT].map(versions)
    keep = version.isna() | (version == expected) | (predictions[STATUS] == "fallback")
    frame = predictions[keep].copy()
    if SHADOW_STATUS in frame and "challenger" in versions:
        stale = (frame[SHADOW_STATUS] == "ok") & (frame[SHADOW_MODEL_VERSION] != versions["challenger"])
        frame.loc[stale, SHADOW_STATUS] = "other_version"
    return frame.reset_index(drop=True)


# --- log continuity ----------------------------------------------------------------------------------------------

CONTINUITY = "log-continuity"
GAP_FALSE_ALARM = 1e-6  # chance that Poisson traffic's own silences are taken for a gap, per analysis
# Silences shorter than this are never gaps, whatever the rate: a loaded machine stalls the gateway's event loop
# and the traffic's own sender for a second or two (seen at 1 s in the fault scenarios on 2 busy cores, where the
# evidence kept restarting and a healthy shadow never passed); a killed or hung gateway is gone for longer.
GAP_FLOOR_S = 2.5
MIN_ROWS_FOR_RATE = 20  # fewer rows say too little about the rate; no guardrail passes on so few anyway
FLUSH_SLACK_S = 1.0  # beyond the flush interval: the flush loop's tick, the write, a busy machine


def max_silence_s(rows: int, span_s: float) -> float:
    """The longest silence between log rows that traffic at the observed rate explains.

    Construction: arrivals are taken as Poisson with rate lambda, estimated as (rows - 1) / span. Its n
    inter-arrival times are i.i.d. Exp(lambda), so P(max > t) <= n * exp(-lambda * t) (union bound); with
    t = ln(n / GAP_FALSE_ALARM) / lambda a silence longer than t happens by chance with probability
    <= GAP_FALSE_ALARM. The estimate includes any gap, which lowers lambda and raises t: a gap makes itself
    harder, never easier, to see. Burstier-than-Poisson traffic (a lull at night) can be taken for a gap; that
    errs on the safe side (evidence restarts; nothing passes on it). Infinite with too few rows to say."""
    if rows < MIN_ROWS_FOR_RATE or span_s <= 0:
        return math.inf
    rate = (rows - 1) / span_s
    return max(GAP_FLOOR_S, math.log(rows / GAP_FALSE_ALARM) / rate)


@dataclass(frozen=True)
class LogContinuity:
    """Where the evidence of a window may start, and whether the log is stale at its end."""

    evidence_from: float  # rows before it are not judged: the window restarts after the last gap
    gap_s: float  # the longest gap found inside the window (0.0: none)
    gap_at: float | None  # where that gap ended
    stale_s: float  # how far the newest row lags behind the analysis time
    allowed_s: float  # the longest silence the rate explains (plus the flush lag, for the end)

    @property
    def stale(self) -> bool:
        return self.stale_s > self.allowed_s

    @property
    def found(self) -> bool:
        return self.stale or self.gap_s > 0


def log_continuity(times: np.ndarray, since: float, until: float, flush_s: float) -> LogContinuity:
    """Gaps in the log rows' times (`ts`, the answer time) over the window `[since, until)`. Rows written within
    `flush_s` (+ `FLUSH_SLACK_S`) of `until` may not be on disk yet: the end is allowed that much more."""
    ordered = np.sort(np.asarray(times, dtype=float))
    if ordered.size == 0:
        return LogContinuity(since, 0.0, None, until - since, math.inf)
    allowed = max_silence_s(ordered.size, float(ordered[-1] - ordered[0]))
    evidence_from, gap_s, gap_at = since, 0.0, None
    if ordered.size > 1 and math.isfinite(allowed):
        silences = np.diff(ordered)
        gaps = np.flatnonzero(silences > allowed)
        if gaps.size:
            last = int(gaps[-1])
            evidence_from = float(ordered[last + 1])
            longest = int(gaps[np.argmax(silences[gaps])])
            gap_s, gap_at = float(silences[longest]), float(ordered[longest + 1])
    return LogContinuity(evidence_from, gap_s, gap_at, float(until - ordered[-1]), allowed + flush_s + FLUSH_SLACK_S)


def continuity_result(continuity: LogContinuity) -> GuardrailResult:
    """The continuity check as a guardrail result: inconclusive on a stale log (so the analysis cannot pass),
    pass when the judged window is continuous again after a gap."""
    if continuity.stale:
        verdict: Verdict = "inconclusive"
        detail = (
            f"the prediction log is stale: its newest row is {continuity.stale_s:.1f}s old "
            f"(at most {continuity.allowed_s:.1f}s expected); nothing is passed on it"
        )
    else:
        verdict = "pass"
        detail = f"a {continuity.gap_s:.1f}s gap in the prediction log; evidence restarts after it"
    return GuardrailResult(
        name=CONTINUITY,
        verdict=verdict,
        value=round(max(continuity.gap_s, continuity.stale_s), 3),
        baseline=None,
        limit=round(continuity.allowed_s, 3) if math.isfinite(continuity.allowed_s) else -1.0,
        samples=0,
        min_samples=MIN_ROWS_FOR_RATE,
        test="poisson-silence",
        confidence=1 - GAP_FALSE_ALARM,
        p_value=None,
        detail=detail,
    )


def to_analysis(
    results: list[GuardrailResult], phase_index: int, at: float, samples: int, window: dict[str, Any] | None = None
) -> AnalysisResult:
    verdicts: dict[str, Verdict] = {r.name: r.verdict for r in results}
    values: dict[str, dict[str, Any]] = {r.name: r.to_dict() for r in results}
    return AnalysisResult(
        at=at, phase_index=phase_index, samples=samples, verdicts=verdicts, values=values, window=window
    )


def analyse(
    spec: RolloutSpec,
    phase_kind: str,
    phase_index: int,
    log_dir: str | Path,
    since: float,
    at: float,
    *,
    threshold: float,
    versions: dict[str, str] | None = None,
    prometheus: PrometheusClient | None = None,
    flush_s: float = 1.0,
) -> AnalysisResult:
    """Guardrails over the prediction log written since the phase started (the window under analysis);
    with `versions` (variant -> model version), over the rows those versions answered only. Prometheus
    guardrails read `prometheus` over the same phase (inconclusive, with the reason, without it). `flush_s`:
    the gateway's flush interval (`MLOPS_LOG_FLUSH_SECONDS`), how far behind `at` its newest rows may be."""
    log_dir = Path(log_dir)
    window = read_window(log_dir / "predictions", since, at)
    # Continuity over every row the gateway logged (degraded and forced answers too: they show it was logging).
    continuity = log_continuity(window[TS].to_numpy() if not window.empty else np.array([]), since, at, flush_s)
    if not window.empty and continuity.evidence_from > since:
        window = window[window[TS] >= continuity.evidence_from].reset_index(drop=True)
    predictions = without_degraded(without_forced(window))
    if versions is not None:
        predictions = rows_of_versions(predictions, versions)
    feedback = read_feedback(
        log_dir / "feedback", predictions.get(REQUEST_ID, pd.Series(dtype=str)), served_times(predictions)
    )
    # What was judged (recorded with the analysis): the phase's window, from the last gap in the log if any.
    judged = {"kind": phase_kind, "since": max(since, continuity.evidence_from), "until": at}
    if predictions.empty:
        return AnalysisResult(at=at, phase_index=phase_index, samples=0, verdicts={}, values={}, window=judged)
    weight = spec.phases[phase_index].weight if phase_kind == "canary" and phase_index < len(spec.phases) else None
    results = evaluate_guardrails(spec, phase_kind, predictions, feedback, threshold=threshold, weight=weight)
    champion_serves = bool((predictions[VARIANT] == "champion").any())
    results += prometheus_guardrail.evaluate(spec, phase_kind, champion_serves, prometheus, since, at)
    if continuity.found:
        results = [*results, continuity_result(continuity)]
    samples = phase_samples(phase_kind, predictions)
    return to_analysis(results, phase_index, at, samples=samples, window=judged)


def phase_samples(phase_kind: str, predictions: pd.DataFrame) -> int:
    """What the phase's `min_samples` counts: challenger-served requests, or shadow-scored (replayed) ones."""
    if phase_kind in ("shadow", "replay"):
        return int((predictions.get(SHADOW_STATUS) == "ok").sum()) if SHADOW_STATUS in predictions else 0
    if phase_kind == "canary":
        return int(((predictions[VARIANT] == "challenger") | (predictions[STATUS] == "fallback")).sum())
    return len(predictions)
