"""Offline evaluation: fraud metrics overall and per slice, comparison with the champion, the gate.

Metrics chosen for a rare positive class: PR-AUC (ROC-AUC flatters a model when 98 % of rows are
negatives), recall at a fixed precision (how much fraud we catch at an acceptable false-alarm rate),
log loss and expected calibration error (the scores drive a threshold and online guardrails, so they
must be probabilities). Slices expose models that work on average but fail one country or merchant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, log_loss, precision_recall_curve, roc_auc_score

from core.schema import LABEL, SLICE_COLUMNS


def recall_at_precision(labels: np.ndarray, scores: np.ndarray, precision_target: float) -> float:
    """Highest recall reachable at a threshold whose precision is at least `precision_target`."""
    if labels.sum() == 0:
        return float("nan")
    precision, recall, _ = precision_recall_curve(labels, scores)
    reachable = recall[precision >= precision_target]
    return float(reachable.max()) if reachable.size else 0.0


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-mass bins: with 2 % positives, equal-width bins would leave the top bins empty."""
    if len(labels) == 0:
        return float("nan")
    order = np.argsort(scores)
    error = 0.0
    for chunk in np.array_split(order, min(bins, len(order))):
        error += len(chunk) * abs(float(scores[chunk].mean()) - float(labels[chunk].mean()))
    return error / len(labels)


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, precision_target: float = 0.5, threshold: float = 0.5
) -> dict[str, float]:
    labels = np.asarray(labels, dtype="int64")
    scores = np.clip(np.asarray(scores, dtype="float64"), 1e-7, 1 - 1e-7)
    both = 0 < labels.sum() < len(labels)
    decided = scores >= threshold
    true_positive = float((decided & (labels == 1)).sum())
    return {
        "rows": float(len(labels)),
        "positives": float(labels.sum()),
        "pr_auc": float(average_precision_score(labels, scores)) if both else float("nan"),
        "roc_auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "recall_at_precision": recall_at_precision(labels, scores, precision_target),
        "log_loss": float(log_loss(labels, scores, labels=[0, 1])) if len(labels) else float("nan"),
        "ece": expected_calibration_error(labels, scores),
        "precision_at_threshold": true_positive / decided.sum() if decided.sum() else float("nan"),
        "recall_at_threshold": true_positive / labels.sum() if labels.sum() else float("nan"),
    }


def slice_metrics(
    frame: pd.DataFrame,
    scores: np.ndarray,
    columns: tuple[str, ...] = SLICE_COLUMNS,
    min_positives: int = 10,
    precision_target: float = 0.5,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per-slice PR-AUC and recall; slices with fewer than `min_positives` frauds are too noisy to judge."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for column in columns:
        result[column] = {}
        for value, index in frame.groupby(column, observed=True).indices.items():
            labels = frame[LABEL].to_numpy()[index]
            if labels.sum() < min_positives or labels.sum() == len(labels):
                continue
            metrics = compute_metrics(labels, scores[index], precision_target)
            result[column][str(value)] = {k: metrics[k] for k in ("rows", "positives", "pr_auc", "recall_at_precision")}
    return result


def slice_gaps(slices: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Largest PR-AUC difference between slices of each column: the fairness-gap headline number."""
    gaps = {}
    for column, values in slices.items():
        aucs = [v["pr_auc"] for v in values.values() if not math.isnan(v["pr_auc"])]
        gaps[f"slice_gap_pr_auc_{column}"] = float(max(aucs) - min(aucs)) if len(aucs) >= 2 else 0.0
    return gaps


@dataclass
class GateTolerances:
    min_pr_auc: float = 0.2
    max_pr_auc_drop: float = 0.02  # vs the champion, on the same holdout
    max_ece: float = 0.05


@dataclass
class GateCheck:
    name: str
    passed: bool
    value: float
    limit: float
    detail: str


@dataclass
class GateDecision:
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)

    def reasons(self) -> str:
        failed = [check.detail for check in self.checks if not check.passed]
        return "; ".join(failed) if failed else "all offline checks passed"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks], "reason": self.reasons()}


def offline_gate(
    candidate: dict[str, float], champion: dict[str, float] | None, tolerances: GateTolerances
) -> GateDecision:
    """Pure decision: may this model be registered? NaN metrics fail (no evidence is not a pass)."""
    checks = [
        _at_least("pr_auc", candidate["pr_auc"], tolerances.min_pr_auc, "PR-AUC"),
        _at_most("ece", candidate["ece"], tolerances.max_ece, "calibration error"),
    ]
    if champion is not None:
        floor = champion["pr_auc"] - tolerances.max_pr_auc_drop
        checks.append(
            _at_least(
                "pr_auc_vs_champion",
                candidate["pr_auc"],
                floor,
                f"PR-AUC vs champion {champion['pr_auc']:.4f} - {tolerances.max_pr_auc_drop}",
            )
        )
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)


def _at_least(name: str, value: float, limit: float, label: str) -> GateCheck:
    passed = not math.isnan(value) and value >= limit
    return GateCheck(name, passed, value, limit, f"{label} {value:.4f} {'>=' if passed else '<'} {limit:.4f}")


def _at_most(name: str, value: float, limit: float, label: str) -> GateCheck:
    passed = not math.isnan(value) and value <= limit
    return GateCheck(name, passed, value, limit, f"{label} {value:.4f} {'<=' if passed else '>'} {limit:.4f}")
