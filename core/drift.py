"""Data-drift check of new transactions (or scores) against a reference window, computed by Evidently 0.7.

Evidently does the statistics and picks the test per column (for a reference of at most 1,000 rows: K-S for
numeric, chi-square for categorical, p-values; above that: normed Wasserstein for numeric and Jensen-Shannon for
categorical, distances). We only prepare the frames, run its `DataDriftPreset` and read its structured snapshot
back into a small, JSON-friendly `DriftSummary` that the drift monitor and the pipeline can act on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from core.schema import CATEGORICAL_FEATURES, NUMERIC_FEATURES

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
_DRIFTED_COUNT = "evidently:metric_v2:DriftedColumnsCount"


@dataclass
class DriftSummary:
    """What Evidently found when comparing the current frame with the reference frame."""

    drift_share: float  # share of checked columns that drifted (0..1)
    drifted_columns: list[str]
    column_scores: dict[str, float]  # p-value or distance, whichever the column's stat test reports
    column_methods: dict[str, str]  # the stat test Evidently chose (or was told to use) per column
    dataset_drift: bool  # drift_share >= the share threshold
    reference_rows: int
    current_rows: int
    report_html: str | None  # path of the HTML report written, if one was asked for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    html_path: str | Path | None,
    numeric_columns: Sequence[str] = NUMERIC_FEATURES,
    categorical_columns: Sequence[str] = CATEGORICAL_FEATURES,
    extra_numeric: Sequence[str] = (),
    drift_share_threshold: float = 0.5,
    max_rows: int = 20_000,
    seed: int = 0,
) -> DriftSummary:
    """Compare `current` with `reference` column by column; write Evidently's HTML report to `html_path` if given."""
    numeric = _unique([*numeric_columns, *extra_numeric])
    categorical = _unique(categorical_columns)
    _check_inputs(reference, current, numeric, categorical, drift_share_threshold, max_rows)
    columns = [*numeric, *categorical]
    reference = _sample(reference, columns, max_rows, seed)
    current = _sample(current, columns, max_rows, seed)
    snapshot = _run_report(reference, current, numeric, categorical, drift_share_threshold)
    summary = _summarise(snapshot.dict(), drift_share_threshold, len(reference), len(current))
    if html_path is not None:
        summary.report_html = _write_html(snapshot, Path(html_path))
    return summary


def _unique(columns: Sequence[str]) -> list[str]:
    # A caller may pass "score" both in numeric_columns and extra_numeric; Evidently must see it once.
    return list(dict.fromkeys(columns))


def _check_inputs(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    threshold: float,
    max_rows: int,
) -> None:
    """Fail early with a plain message: Evidently's own errors for these cases are deep and cryptic."""
    if not numeric and not categorical:
        raise ValueError("no columns to check for drift")
    if both := sorted(set(numeric) & set(categorical)):
        raise ValueError(f"columns declared both numeric and categorical: {', '.join(both)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"drift_share_threshold must be in (0, 1], got {threshold}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    for name, frame in (("reference", reference), ("current", current)):
        if frame.empty:
            raise ValueError(f"{name} frame is empty: drift needs rows on both sides")
        if missing := [c for c in [*numeric, *categorical] if c not in frame.columns]:
            raise ValueError(f"columns missing from the {name} frame: {', '.join(missing)}")
        if wrong := [c for c in numeric if not pd.api.types.is_numeric_dtype(frame[c])]:
            raise ValueError(f"numeric columns with a non-numeric dtype in the {name} frame: {', '.join(wrong)}")


def _sample(frame: pd.DataFrame, columns: list[str], max_rows: int, seed: int) -> pd.DataFrame:
    # Evidently's cost grows with rows; a seeded sample keeps the check fast and its result reproducible.
    frame = frame[columns]
    if len(frame) > max_rows:
        frame = frame.sample(n=max_rows, random_state=seed)
    return frame.reset_index(drop=True)


def _run_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    threshold: float,
) -> Snapshot:
    # Imported here: `import evidently` takes seconds and emits deprecation noise, which callers that
    # merely import this module (CLI, pipeline definitions) should not pay for.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from evidently import DataDefinition, Dataset, Report
        from evidently.presets import DataDriftPreset

        definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
        # include_tests=True: the per-column drift verdicts (pass/fail) only appear in the snapshot as tests.
        report = Report([DataDriftPreset(columns=[*numeric, *categorical], drift_share=threshold)], include_tests=True)
        # scipy's chi-square divides by zero for categories unseen in the reference (p-value 0): expected, silenced.
        return report.run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )


def _summarise(snapshot: dict[str, Any], threshold: float, reference_rows: int, current_rows: int) -> DriftSummary:
    """Read the preset's DriftedColumnsCount, its ValueDrift metrics and their tests out of `snapshot.dict()`."""
    share = next(float(m["value"]["share"]) for m in snapshot["metrics"] if m["config"]["type"] == _DRIFTED_COUNT)
    drift_metrics = [m for m in snapshot["metrics"] if m["config"]["type"] == _VALUE_DRIFT]
    scores = {m["config"]["column"]: float(m["value"]) for m in drift_metrics}
    methods = {m["config"]["column"]: str(m["config"]["method"]) for m in drift_metrics}
    # A ValueDrift test FAILs when its column drifted; this keeps the p-value vs distance direction Evidently's call.
    drifted = [
        t["metric_config"]["params"]["column"]
        for t in snapshot["tests"]
        if t["metric_config"]["params"]["type"] == _VALUE_DRIFT and t["status"] == "FAIL"
    ]
    return DriftSummary(
        drift_share=share,
        drifted_columns=drifted,
        column_scores=scores,
        column_methods=methods,
        dataset_drift=share >= threshold,
        reference_rows=reference_rows,
        current_rows=current_rows,
        report_html=None,
    )


def _write_html(snapshot: Snapshot, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot.save_html(str(path))
    return str(path)
