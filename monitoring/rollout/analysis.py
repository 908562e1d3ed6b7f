"""One analysis run: read a window of the prediction log and the labels, run the guardrails, and turn
their results into the `AnalysisResult` the controller's state machine consumes.

The prediction log is a data contract (Parquet files written by the gateway), not a service: the
controller reads the files; it never imports the gateway. Files are skipped by modification time
when they cannot hold rows of the window, so an analysis costs the window, not the whole history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from core.prediction_log import (
    MODEL_VERSION,
    REQUEST_ID,
    SHADOW_MODEL_VERSION,
    SHADOW_STATUS,
    STATUS,
    VARIANT,
    read_feedback,
    read_window,
    served_times,
    without_forced,
)
from monitoring.rollout.guardrails import GuardrailResult, evaluate_guardrails
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
) -> AnalysisResult:
    """Guardrails over the prediction log written since the phase started (the window under analysis);
    with `versions` (variant -> model version), over the rows those versions answered only."""
    log_dir = Path(log_dir)
    predictions = without_forced(read_window(log_dir / "predictions", since, at))
    if versions is not None:
        predictions = rows_of_versions(predictions, versions)
    feedback = read_feedback(
        log_dir / "feedback", predictions.get(REQUEST_ID, pd.Series(dtype=str)), served_times(predictions)
    )
    window = {"kind": phase_kind, "since": since, "until": at}
    if predictions.empty:
        return AnalysisResult(at=at, phase_index=phase_index, samples=0, verdicts={}, values={}, window=window)
    results = evaluate_guardrails(spec, phase_kind, predictions, feedback, threshold=threshold)
    return to_analysis(results, phase_index, at, samples=phase_samples(phase_kind, predictions), window=window)


def phase_samples(phase_kind: str, predictions: pd.DataFrame) -> int:
    """What the phase's `min_samples` counts: challenger-served requests, or shadow-scored (replayed) ones."""
    if phase_kind in ("shadow", "replay"):
        return int((predictions.get(SHADOW_STATUS) == "ok").sum()) if SHADOW_STATUS in predictions else 0
    if phase_kind == "canary":
        return int(((predictions[VARIANT] == "challenger") | (predictions[STATUS] == "fallback")).sum())
    return len(predictions)
