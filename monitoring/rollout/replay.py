"""The replay phase: recent labelled requests from the prediction log, scored again by the challenger.

The prediction log already holds what the champion answered to thousands of recent requests, with their
features, and the labels that have arrived for them. Replaying the last `requests` of them through the
challenger's slot (its batch endpoint, over HTTP) gives paired, labelled evidence in seconds, before the
challenger sees a single live request.

Which requests: those the champion's version answered itself (`status == ok`, not forced by QA), served at least
`label_delay_s` ago (so their labels have had time to arrive) and at most `lookback_s` ago, that have a label;
the newest `requests` of them. The log is read newest file first, and only as far back as it takes.

How they are judged: the replayed answers are laid out as the shadow phase's rows (the champion's logged answer,
and the challenger's as `shadow_*`), and the spec's guardrails that apply to `replay` judge them, paired, by the
same code as shadow (`monitoring.rollout.guardrails`). A batch call that fails marks its requests as challenger
errors, clustered by batch call (the `ts` of the judged frame is the batch's index: one failed call fails a whole
batch at once); answers from another model version than the challenger's (the slot has not loaded it) are marked
`other_version` and left out.

The I/O (reading the log, calling the slot) is the driver's (`Controller._replay`, `Effects.score_batch`); the
functions here that turn a sample and the slot's answers into an `AnalysisResult` are pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from core.prediction_log import (
    ACCOUNT_ID,
    LABEL,
    MODEL_VERSION,
    REQUEST_ID,
    SCORE,
    SHADOW_LATENCY_MS,
    SHADOW_MODEL_VERSION,
    SHADOW_SCORE,
    SHADOW_STATUS,
    STATUS,
    TS,
    VARIANT,
    read_feedback,
    served_times,
    without_forced,
)
from core.schema import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from monitoring.rollout.analysis import phase_samples, to_analysis
from monitoring.rollout.guardrails import evaluate_guardrails
from monitoring.rollout.spec import RolloutSpec
from monitoring.rollout.state_machine import AnalysisResult

# Instances per batch call (the slot takes at most 1,000 and 256 KiB a body). Small, because a failed call fails
# all its requests at once: errors are clustered by call, and few large clusters leave the error rate undecided.
BATCH_SIZE = 100


@dataclass(frozen=True)
class BatchAnswer:
    """What the challenger's slot answered to one batch call: its model version and one score per instance,
    or an error (a refused or failed call, or no answer)."""

    version: str | None
    scores: list[float] | None
    error: str | None
    latency_ms: float


@dataclass(frozen=True)
class ReplaySample:
    """The requests to replay (the champion's logged rows, oldest first), their labels, and the window."""

    rows: pd.DataFrame
    feedback: pd.DataFrame
    window: dict[str, Any]


def _candidates(frame: pd.DataFrame, champion_version: str, since: float, until: float) -> pd.DataFrame:
    """Rows the champion's version answered itself within [since, until)."""
    if frame.empty:
        return frame
    frame = without_forced(frame)
    keep = (
        (frame[MODEL_VERSION] == champion_version)
        & (frame[STATUS] == "ok")
        & frame[SCORE].notna()
        & (frame[TS] >= since)
        & (frame[TS] < until)
    )
    return frame[keep]


def select_sample(
    log_dir: str | Path,
    champion_version: str,
    now: float,
    requests: int,
    label_delay_s: float,
    lookback_s: float,
) -> ReplaySample:
    """The newest `requests` labelled requests the champion answered in [now - lookback_s, now - label_delay_s),
    reading the log's files newest first and only as many as it takes (reads the log: driver side)."""
    log_dir = Path(log_dir)
    since, until = now - lookback_s, now - label_delay_s
    window: dict[str, Any] = {
        "kind": "replay",
        "champion_version": champion_version,
        "requested": requests,
        "label_delay_s": label_delay_s,
        "lookback_s": lookback_s,
        "not_before": since,
        "served_before": until,
    }
    paths = [p for p in (log_dir / "predictions").glob("*.parquet") if p.stat().st_mtime >= since]
    paths.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    tables: list[pd.DataFrame] = []
    found = 0
    target = 2 * requests  # candidates to gather before looking their labels up; doubled while labels fall short
    labelled = pd.DataFrame()
    feedback = pd.DataFrame(columns=[REQUEST_ID, LABEL])
    index = 0
    while True:
        while index < len(paths) and found < target:
            frame = _candidates(pq.read_table(paths[index]).to_pandas(), champion_version, since, until)
            index += 1
            if not frame.empty:
                tables.append(frame)
                found += len(frame)
        candidates = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        if not candidates.empty:
            candidates = candidates.drop_duplicates(REQUEST_ID)
            feedback = read_feedback(log_dir / "feedback", candidates[REQUEST_ID], served_times(candidates))
            labels = feedback[feedback[LABEL].isin([0, 1])]
            labelled = candidates[candidates[REQUEST_ID].isin(set(labels[REQUEST_ID]))]
        if len(labelled) >= requests or index >= len(paths):
            break
        target *= 2
    if labelled.empty:
        return ReplaySample(pd.DataFrame(), feedback.iloc[0:0], {**window, "labelled_found": 0})
    chosen = labelled.sort_values(TS, kind="stable").tail(requests).reset_index(drop=True)
    feedback = feedback[feedback[REQUEST_ID].isin(set(chosen[REQUEST_ID]))].reset_index(drop=True)
    window |= {
        "labelled_found": len(chosen),
        "since": float(chosen[TS].min()),
        "until": float(chosen[TS].max()),
        "frauds": int(feedback[LABEL].sum()),
    }
    return ReplaySample(chosen, feedback, window)


def instances(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """The scoring requests to send again: the account and the model's inputs, as the gateway logged them."""
    columns = [ACCOUNT_ID, *NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    records = rows[columns].to_dict(orient="records")
    for record in records:
        for name in NUMERIC_FEATURES:  # the log stores every number as a float; the request wants ints for some
            value = record[name]
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                record[name] = int(value)
    return records


def batches(count: int, size: int = BATCH_SIZE) -> list[tuple[int, int]]:
    """[start, stop) of each batch call."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def replay_frame(rows: pd.DataFrame, answers: list[BatchAnswer], challenger_version: str) -> pd.DataFrame:
    """The replayed requests as shadow rows: the champion's logged answer, the challenger's as `shadow_*` (see
    the module docstring); `answers` holds one BatchAnswer per `batches(len(rows))`, in order."""
    spans = batches(len(rows))
    if len(answers) != len(spans):
        raise ValueError(f"{len(answers)} answers for {len(spans)} batches")
    frame = rows.copy().reset_index(drop=True)
    status = np.full(len(frame), "error", dtype=object)
    score = np.full(len(frame), np.nan)
    latency = np.full(len(frame), np.nan)
    batch = np.zeros(len(frame))
    for number, ((start, stop), answer) in enumerate(zip(spans, answers, strict=True)):
        batch[start:stop] = number
        latency[start:stop] = answer.latency_ms
        if answer.error is None and answer.scores is not None and len(answer.scores) == stop - start:
            status[start:stop] = "ok" if answer.version == challenger_version else "other_version"
            score[start:stop] = answer.scores
    frame[VARIANT] = "champion"
    frame[SHADOW_STATUS] = status
    frame[SHADOW_SCORE] = np.where(status == "ok", score, np.nan)
    frame[SHADOW_MODEL_VERSION] = challenger_version
    frame[SHADOW_LATENCY_MS] = latency
    frame[TS] = batch  # errors cluster by batch call (see the module docstring)
    return frame


def replay_analysis(
    spec: RolloutSpec,
    phase_index: int,
    sample: ReplaySample,
    answers: list[BatchAnswer],
    challenger_version: str,
    at: float,
    *,
    threshold: float,
) -> AnalysisResult:
    """Judge a replay with the spec's guardrails that apply to `replay` (pure)."""
    if sample.rows.empty:
        return AnalysisResult(at=at, phase_index=phase_index, samples=0, verdicts={}, values={}, window=sample.window)
    frame = replay_frame(sample.rows, answers, challenger_version)
    counts = pd.Series(frame[SHADOW_STATUS]).value_counts()
    window = {
        **sample.window,
        "replayed": int(counts.get("ok", 0)),
        "errors": int(counts.get("error", 0)),
        "other_version": int(counts.get("other_version", 0)),
        "batch_calls": len(answers),
        "challenger_version": challenger_version,
    }
    results = evaluate_guardrails(spec, "replay", frame, sample.feedback, threshold=threshold)
    return to_analysis(results, phase_index, at, samples=phase_samples("replay", frame), window=window)
