"""Guardrails: statistical checks of a challenger against the champion, from the prediction log and feedback.

Pure functions over DataFrames; no I/O. `evaluate_guardrails(spec, phase_kind, predictions, feedback)` returns
one `GuardrailResult` per guardrail of the spec that applies to the phase kind.

Who is compared with whom (`observe`):

- shadow: the champion's own rows vs the challenger's shadow answers on the same requests (the `shadow_*`
  columns; `dropped`/`cancelled` shadow calls are the gateway's doing and are left out, `error` counts).
- canary: rows routed to the challenger (`variant == "challenger"`, plus `status == "fallback"` rows: the
  challenger failed and the champion answered, so they are challenger errors whose score is the champion's
  and is not used) vs rows the champion answered as champion.
- watch (after promotion): the champion's rows alone, against each guardrail's absolute bound.

Each result is one of three verdicts. Below `min_samples` it is always `inconclusive`. `fail` needs a one-sided
test to reject "the challenger is within the limit" at the stated confidence, so an identical challenger fails
at most 1 - confidence of the time (less, since every limit leaves a margin). `pass` needs evidence the other way:

- error rate and shadow agreement: the confidence bound lies within the limit (the limit is shown, not assumed);
- latency, online recall and log loss: the estimate lies within the limit and the test did not reject. A tail
  quantile or a few hundred labelled frauds cannot bound the difference tightly within a rollout, so here the
  guarantee is the test's power at `min_samples`: choose it with `required_labelled_frauds` for recall;
- score shift: the population stability index (an effect size) is within `max_psi`.

In a canary phase where the champion has fewer than `min_samples` requests (the 100 % step), a guardrail with
an absolute (watch) bound is held to that bound instead; otherwise it stays inconclusive.

`limit` in a result is the guardrail's configured limit (its meaning per kind is in each function's docstring);
`detail` says in words what was compared, the counts, the statistic and the decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from monitoring.rollout.spec import (
    ErrorRateGuardrail,
    GuardrailConfig,
    LatencyP99Guardrail,
    OnlineLogLossGuardrail,
    OnlineRecallGuardrail,
    RolloutSpec,
    ScoreShiftGuardrail,
    ShadowAgreementGuardrail,
)
from monitoring.rollout.verdicts import Verdict, combine_verdicts

PHASE_KINDS = ("shadow", "canary", "watch")
LOG_LOSS_CLIP = 1e-6  # scores of exactly 0 or 1 cost at most -log(1e-6) = 13.8 nats


@dataclass(frozen=True)
class GuardrailResult:
    """The outcome of one guardrail on one analysis."""

    name: str
    verdict: Verdict
    value: float | None
    baseline: float | None
    limit: float
    samples: int
    min_samples: int
    test: str
    confidence: float
    p_value: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Arm:
    """The requests one model answered or failed, one entry per request (NaN where unknown)."""

    name: str
    error: np.ndarray  # bool: the model failed this request
    latency_ms: np.ndarray  # float
    score: np.ndarray  # float; NaN on an error (a fallback row's score is the champion's, so NaN too)
    label: np.ndarray  # float 0/1 from the feedback log; NaN while unlabelled

    @property
    def requests(self) -> int:
        return len(self.error)

    def latencies(self) -> np.ndarray:
        return self.latency_ms[np.isfinite(self.latency_ms)]

    def scores(self) -> np.ndarray:
        return self.score[np.isfinite(self.score)]

    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """(score, label) of the requests that have both."""
        keep = np.isfinite(self.score) & np.isfinite(self.label)
        return self.score[keep], self.label[keep]


@dataclass(frozen=True)
class Observations:
    """What the guardrails of one phase kind look at: the candidate, the champion baseline (none in watch),
    and in shadow the (champion score, shadow score) pairs of the same requests."""

    phase_kind: str
    candidate: Arm
    baseline: Arm | None
    pairs: np.ndarray  # shape (n, 2); empty outside shadow
    threshold: float


def _column(frame: pd.DataFrame, name: str, dtype: str = "object") -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series(np.full(len(frame), None), index=frame.index, dtype=dtype)


def _floats(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _labels(predictions: pd.DataFrame, feedback: pd.DataFrame | None) -> pd.Series:
    """Label per prediction row (NaN where none): the latest feedback per request_id, 0/1 only."""
    if feedback is None or feedback.empty or "label" not in feedback.columns:
        return pd.Series(np.nan, index=predictions.index)
    latest = feedback.sort_values("received_at", kind="stable") if "received_at" in feedback.columns else feedback
    latest = latest.drop_duplicates("request_id", keep="last").set_index("request_id")["label"]
    label = pd.to_numeric(predictions["request_id"].map(latest), errors="coerce")
    return label.where(label.isin([0, 1]))


def _arm(name: str, rows: pd.DataFrame, label: pd.Series, prefix: str = "") -> Arm:
    status = _column(rows, f"{prefix}status").astype("object")
    ok = (status == "ok").to_numpy()
    score = _floats(_column(rows, f"{prefix}score", "float64"))
    return Arm(
        name=name,
        error=~ok,
        latency_ms=_floats(_column(rows, f"{prefix}latency_ms", "float64")),
        score=np.where(ok, score, np.nan),
        label=label.loc[rows.index].to_numpy(dtype=float, na_value=np.nan),
    )


def observe(
    phase_kind: str,
    predictions: pd.DataFrame,
    feedback: pd.DataFrame | None,
    *,
    threshold: float,
) -> Observations:
    """Split the prediction log into the arms a phase compares (see the module docstring)."""
    if phase_kind not in PHASE_KINDS:
        raise ValueError(f"phase_kind must be one of {', '.join(PHASE_KINDS)}, got {phase_kind!r}")
    frame = predictions.reset_index(drop=True)
    label = _labels(frame, feedback)
    variant, status = _column(frame, "variant"), _column(frame, "status")
    challenger_rows = (variant == "challenger") | (status == "fallback")
    champion = _arm("champion", frame[(variant == "champion") & ~challenger_rows], label)
    empty_pairs = np.empty((0, 2))
    if phase_kind == "watch":
        return Observations(phase_kind, champion, None, empty_pairs, threshold)
    if phase_kind == "canary":
        return Observations(
            phase_kind, _arm("challenger", frame[challenger_rows], label), champion, empty_pairs, threshold
        )
    shadow_status = _column(frame, "shadow_status")
    shadowed = frame[(variant == "champion") & ~challenger_rows & shadow_status.isin(["ok", "error"])]
    paired = shadowed[(_column(shadowed, "shadow_status") == "ok") & (_column(shadowed, "status") == "ok")]
    pairs = np.column_stack([_floats(paired["score"]), _floats(_column(paired, "shadow_score", "float64"))])
    pairs = pairs[np.isfinite(pairs).all(axis=1)]
    return Observations(phase_kind, _arm("shadow", shadowed, label, prefix="shadow_"), champion, pairs, threshold)


# ---------------------------------------------------------------- statistics (vectorisable cores)


def two_proportion_margin_test(
    x_candidate: Any, n_candidate: Any, x_baseline: Any, n_baseline: Any, margin: float, confidence: float
) -> tuple[Any, Any, Any]:
    """One-sided two-proportion z-test of H0: p_candidate - p_baseline <= margin against H1: > margin.

    Agresti-Caffo adjusted (one success and one failure added to each arm) so the standard error is never zero
    and small samples keep their nominal level. Returns (difference, p-value, upper confidence bound of the
    difference at `confidence`). Works elementwise on numpy arrays.
    """
    p_c = (np.asarray(x_candidate) + 1) / (np.asarray(n_candidate) + 2)
    p_b = (np.asarray(x_baseline) + 1) / (np.asarray(n_baseline) + 2)
    diff = p_c - p_b
    se = np.sqrt(p_c * (1 - p_c) / (np.asarray(n_candidate) + 2) + p_b * (1 - p_b) / (np.asarray(n_baseline) + 2))
    p_value = stats.norm.sf((diff - margin) / se)
    return diff, p_value, diff + stats.norm.ppf(confidence) * se


def ratio_margin_test(
    k_candidate: Any, n_candidate: Any, k_baseline: Any, n_baseline: Any, max_drop: float
) -> tuple[Any, Any]:
    """One-sided Wald z-test of H0: r_candidate >= (1 - max_drop) * r_baseline against H1: r_candidate is lower.

    z = (r_c - m r_b) / sqrt(r_c (1 - r_c) / n_c + m^2 r_b (1 - r_b) / n_b) with m = 1 - max_drop, on
    Agresti-Caffo adjusted proportions. Returns (z, p-value); elementwise on numpy arrays.
    """
    m = 1.0 - max_drop
    r_c = (np.asarray(k_candidate) + 1) / (np.asarray(n_candidate) + 2)
    r_b = (np.asarray(k_baseline) + 1) / (np.asarray(n_baseline) + 2)
    se = np.sqrt(
        r_c * (1 - r_c) / (np.asarray(n_candidate) + 2) + m**2 * r_b * (1 - r_b) / (np.asarray(n_baseline) + 2)
    )
    z = (r_c - m * r_b) / se
    return z, stats.norm.cdf(z)


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """One-sided exact (Clopper-Pearson) bounds: (lower, upper), each holding with probability `confidence`."""
    alpha = 1.0 - confidence
    lower = float(stats.beta.ppf(alpha, successes, trials - successes + 1)) if successes > 0 else 0.0
    upper = float(stats.beta.ppf(confidence, successes + 1, trials - successes)) if successes < trials else 1.0
    return lower, upper


def population_stability_index(expected: np.ndarray, actual: np.ndarray, bins: int = 10, floor: float = 1e-4) -> float:
    """PSI = sum over bins of (a - e) ln(a / e), bins at the quantiles of `expected` (ties merged, so a
    score distribution with point masses gets fewer, wider bins); empty bins count as `floor`."""
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1))[1:-1])
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(expected)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(actual)
    e, a = np.maximum(e, floor), np.maximum(a, floor)
    return float(np.sum((a - e) * np.log(a / e)))


def log_losses(score: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-request log loss in nats, scores clipped to [1e-6, 1 - 1e-6]."""
    p = np.clip(score, LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
    return -(label * np.log(p) + (1 - label) * np.log1p(-p))


def required_labelled_frauds(
    champion_recall: float, relative_drop: float, confidence: float = 0.95, power: float = 0.8, margin: float = 0.0
) -> int:
    """Labelled frauds per variant for the one-sided two-proportion test to detect a recall drop.

    The challenger's recall is r2 = r1 (1 - relative_drop); the test is the one `online_recall` runs, H0:
    r_c >= (1 - margin) r_b (margin = its `max_drop`, 0 for a plain "no drop" test). Closed form (unpooled Wald):
    n = (z_conf + z_power)^2 (r2 (1 - r2) + m^2 r1 (1 - r1)) / (m r1 - r2)^2, with m = 1 - margin.
    """
    if not 0 < champion_recall < 1:
        raise ValueError(f"champion_recall must be in (0, 1), got {champion_recall}")
    if not margin < relative_drop < 1:
        raise ValueError(f"relative_drop must be in ({margin}, 1): a drop within the margin is not a failure")
    r1, r2, m = champion_recall, champion_recall * (1 - relative_drop), 1 - margin
    z = stats.norm.ppf(confidence) + stats.norm.ppf(power)
    return math.ceil(z**2 * (r2 * (1 - r2) + m**2 * r1 * (1 - r1)) / (m * r1 - r2) ** 2)


# ---------------------------------------------------------------- guardrails


def _num(value: Any) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _decide(failed: bool, passed: bool) -> Verdict:
    return "fail" if failed else ("pass" if passed else "inconclusive")


def _result(cfg: GuardrailConfig, verdict: Verdict, **fields: Any) -> GuardrailResult:
    return GuardrailResult(
        name=cfg.name,
        verdict=verdict,
        value=_num(fields.get("value")),
        baseline=_num(fields.get("baseline")),
        limit=float(fields["limit"]),
        samples=int(fields["samples"]),
        min_samples=cfg.min_samples,
        test=fields["test"],
        confidence=cfg.confidence,
        p_value=_num(fields.get("p_value")),
        detail=fields["detail"],
    )


def _too_few(cfg: GuardrailConfig, counts: dict[str, int], **fields: Any) -> GuardrailResult | None:
    """The inconclusive result when any arm has fewer than min_samples, else None."""
    short = {arm: n for arm, n in counts.items() if n < cfg.min_samples}
    if not short:
        return None
    what = ", ".join(f"{arm} has {n}" for arm, n in short.items())
    return _result(
        cfg,
        "inconclusive",
        samples=min(counts.values()),
        detail=f"too few samples: {what} < {cfg.min_samples}",
        **fields,
    )


def _absolute(cfg: GuardrailConfig, obs: Observations, bound: float | None) -> bool:
    """Whether to hold the candidate to the absolute bound: in watch, and in a canary phase whose champion has
    fewer than min_samples requests (the 100 % step) when a bound is configured."""
    if bound is None:
        return False
    return obs.baseline is None or (obs.phase_kind == "canary" and obs.baseline.requests < cfg.min_samples)


def _no_bound(cfg: GuardrailConfig, limit: float, test: str) -> GuardrailResult:
    detail = "no champion to compare with and no absolute bound configured"
    return _result(cfg, "inconclusive", samples=0, limit=limit, test=test, detail=detail)


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def error_rate(cfg: ErrorRateGuardrail, obs: Observations) -> GuardrailResult:
    """Error rate. Relative: one-sided two-proportion z-test (Agresti-Caffo) of H0: p_chal - p_champ <=
    max_increase; fail when rejected, pass when the upper confidence bound of the difference is below
    max_increase. Absolute (watch): exact binomial test of H0: rate <= max_rate; pass when the Clopper-Pearson
    upper bound is below max_rate. value/baseline: error rates; limit: max_increase (watch: max_rate)."""
    cand, alpha = obs.candidate, 1 - cfg.confidence
    x_c, n_c = int(cand.error.sum()), cand.requests
    if _absolute(cfg, obs, cfg.max_rate) and cfg.max_rate is not None:
        test = f"one-sided exact binomial test, H0: {cand.name} error rate <= {cfg.max_rate:g}"
        fields = {"value": x_c / n_c if n_c else None, "limit": cfg.max_rate, "test": test}
        if (short := _too_few(cfg, {cand.name: n_c}, **fields)) is not None:
            return short
        p = stats.binomtest(x_c, n_c, cfg.max_rate, alternative="greater").pvalue
        upper = clopper_pearson(x_c, n_c, cfg.confidence)[1]
        verdict = _decide(p < alpha, upper < cfg.max_rate)
        detail = (
            f"{cand.name} error rate {x_c}/{n_c} = {x_c / n_c:.4f}, upper {cfg.confidence:.0%} bound {upper:.4f} "
            f"vs bound {cfg.max_rate:g} (p={_p(p)}): {verdict}"
        )
        return _result(cfg, verdict, samples=n_c, p_value=p, detail=detail, **fields)
    base = obs.baseline
    if base is None:
        return _no_bound(cfg, cfg.max_increase, "error rate vs champion")
    x_b, n_b = int(base.error.sum()), base.requests
    test = f"one-sided two-proportion z-test (Agresti-Caffo), H0: p_{cand.name} - p_champion <= {cfg.max_increase:g}"
    fields = {
        "value": x_c / n_c if n_c else None,
        "baseline": x_b / n_b if n_b else None,
        "limit": cfg.max_increase,
        "test": test,
    }
    if (short := _too_few(cfg, {cand.name: n_c, "champion": n_b}, **fields)) is not None:
        return short
    diff, p, upper = (
        float(v) for v in two_proportion_margin_test(x_c, n_c, x_b, n_b, cfg.max_increase, cfg.confidence)
    )
    verdict = _decide(p < alpha, upper < cfg.max_increase)
    detail = (
        f"{cand.name} errors {x_c}/{n_c} = {x_c / n_c:.4f} vs champion {x_b}/{n_b} = {x_b / n_b:.4f}: "
        f"difference {diff:+.4f}, upper {cfg.confidence:.0%} bound {upper:+.4f}, allowed +{cfg.max_increase:g} "
        f"(p={_p(p)}): {verdict}"
    )
    return _result(cfg, verdict, samples=min(n_c, n_b), p_value=p, detail=detail, **fields)


def latency_p99(cfg: LatencyP99Guardrail, obs: Observations) -> GuardrailResult:
    """Tail latency (client-visible `latency_ms`, a fallback's included). Relative: one-sided exact binomial
    test on the share s of challenger requests slower than the champion's p99, H0: s <= 0.01 x
    max_ratio_exceedance (an identical challenger has s = 0.01); fail when rejected, pass when the observed
    share is within the null. Absolute (watch): H0: share above max_p99_ms <= 0.01 (p99 <= max_p99_ms).
    value: candidate p99 ms; baseline: champion p99 ms; limit: the allowed share (watch: max_p99_ms)."""
    cand, alpha = obs.candidate, 1 - cfg.confidence
    lat_c = cand.latencies()
    p99_c = float(np.quantile(lat_c, 0.99)) if len(lat_c) else None
    if _absolute(cfg, obs, cfg.max_p99_ms) and cfg.max_p99_ms is not None:
        test = f"one-sided exact binomial test, H0: share of {cand.name} requests > {cfg.max_p99_ms:g} ms <= 0.01"
        fields = {"value": p99_c, "limit": cfg.max_p99_ms, "test": test}
        if (short := _too_few(cfg, {cand.name: len(lat_c)}, **fields)) is not None:
            return short
        k, n = int((lat_c > cfg.max_p99_ms).sum()), len(lat_c)
        p = stats.binomtest(k, n, 0.01, alternative="greater").pvalue
        verdict = _decide(p < alpha, k / n <= 0.01)
        detail = (
            f"{cand.name} p99 {p99_c:.1f} ms; {k}/{n} = {k / n:.4f} of requests above {cfg.max_p99_ms:g} ms, "
            f"allowed 0.01 (p={_p(p)}): {verdict}"
        )
        return _result(cfg, verdict, samples=n, p_value=p, detail=detail, **fields)
    base = obs.baseline
    if base is None:
        return _no_bound(cfg, 0.01 * cfg.max_ratio_exceedance, "p99 latency vs champion")
    lat_b = base.latencies()
    p99_b = float(np.quantile(lat_b, 0.99)) if len(lat_b) else None
    share0 = 0.01 * cfg.max_ratio_exceedance
    test = f"one-sided exact binomial test, H0: share of {cand.name} requests > champion p99 <= {share0:g}"
    fields = {"value": p99_c, "baseline": p99_b, "limit": share0, "test": test}
    if (short := _too_few(cfg, {cand.name: len(lat_c), "champion": len(lat_b)}, **fields)) is not None:
        return short
    k, n = int((lat_c > p99_b).sum()), len(lat_c)
    p = stats.binomtest(k, n, share0, alternative="greater").pvalue
    verdict = _decide(p < alpha, k / n <= share0)
    detail = (
        f"{cand.name} p99 {p99_c:.1f} ms vs champion p99 {p99_b:.1f} ms; {k}/{n} = {k / n:.4f} of {cand.name} "
        f"requests slower than the champion's p99, allowed {share0:g} (p={_p(p)}): {verdict}"
    )
    return _result(cfg, verdict, samples=min(n, len(lat_b)), p_value=p, detail=detail, **fields)


def score_shift(cfg: ScoreShiftGuardrail, obs: Observations) -> GuardrailResult:
    """Score distribution shift. Two-sample Kolmogorov-Smirnov test (H0: same distribution) and the PSI over
    `bins` quantile bins of the champion's scores. fail when KS p < 1 - confidence AND PSI > max_psi (the
    effect size keeps huge samples from failing on trivial shifts); pass when PSI <= max_psi.
    value: PSI; baseline: none; limit: max_psi; p_value: the KS p-value."""
    cand, base = obs.candidate, obs.baseline
    test = f"two-sample Kolmogorov-Smirnov test (H0: same distribution) and PSI over {cfg.bins} champion-quantile bins"
    if base is None:
        return _result(
            cfg, "inconclusive", samples=0, limit=cfg.max_psi, test=test, detail="no champion scores to compare with"
        )
    s_c, s_b = cand.scores(), base.scores()
    fields = {"limit": cfg.max_psi, "test": test}
    if (short := _too_few(cfg, {cand.name: len(s_c), "champion": len(s_b)}, **fields)) is not None:
        return short
    psi = population_stability_index(s_b, s_c, cfg.bins)
    ks = stats.ks_2samp(s_c, s_b)
    p = float(ks.pvalue)
    verdict = _decide(p < 1 - cfg.confidence and psi > cfg.max_psi, psi <= cfg.max_psi)
    detail = (
        f"PSI {psi:.4f} (limit {cfg.max_psi:g}), KS D={ks.statistic:.4f} p={_p(p)}; mean score {cand.name} "
        f"{s_c.mean():.4f} vs champion {s_b.mean():.4f} ({len(s_c)} vs {len(s_b)} scores): {verdict}"
    )
    return _result(cfg, verdict, value=psi, samples=min(len(s_c), len(s_b)), p_value=p, detail=detail, **fields)


def shadow_agreement(cfg: ShadowAgreementGuardrail, obs: Observations) -> GuardrailResult:
    """Decision agreement in shadow: the share a of (champion, shadow) score pairs on the same request that
    fall on the same side of the decision threshold. One-sided exact binomial test of H0: a >= min_agreement;
    fail when rejected, pass when the Clopper-Pearson lower confidence bound is >= min_agreement.
    value: agreement; limit: min_agreement."""
    test = f"one-sided exact binomial test, H0: agreement >= {cfg.min_agreement:g}"
    n = len(obs.pairs)
    agree = int(((obs.pairs[:, 0] >= obs.threshold) == (obs.pairs[:, 1] >= obs.threshold)).sum())
    fields = {"value": agree / n if n else None, "limit": cfg.min_agreement, "test": test}
    if (short := _too_few(cfg, {"paired decisions": n}, **fields)) is not None:
        return short
    p = stats.binomtest(agree, n, cfg.min_agreement, alternative="less").pvalue
    lower = clopper_pearson(agree, n, cfg.confidence)[0]
    verdict = _decide(p < 1 - cfg.confidence, lower >= cfg.min_agreement)
    detail = (
        f"{agree}/{n} = {agree / n:.4f} paired decisions agree at threshold {obs.threshold:g}, lower "
        f"{cfg.confidence:.0%} bound {lower:.4f} vs required {cfg.min_agreement:g} (p={_p(p)}): {verdict}"
    )
    return _result(cfg, verdict, samples=n, p_value=p, detail=detail, **fields)


def _recall_counts(arm: Arm, threshold: float) -> tuple[int, int]:
    score, label = arm.labelled()
    positives = score[label == 1]
    return int((positives >= threshold).sum()), len(positives)


def online_recall(cfg: OnlineRecallGuardrail, obs: Observations) -> GuardrailResult:
    """Recall at the decision threshold among labelled frauds (feedback joined by request_id; min_samples
    counts labelled frauds per variant). Relative: one-sided two-proportion (Wald, ratio margin) test of
    H0: recall_chal >= (1 - max_drop) recall_champ; fail when rejected, pass when the observed recall is within
    the margin. Absolute (watch): exact binomial test of H0: recall >= min_recall.
    value/baseline: recalls; limit: max_drop (watch: min_recall)."""
    cand, alpha = obs.candidate, 1 - cfg.confidence
    k_c, n_c = _recall_counts(cand, obs.threshold)
    if _absolute(cfg, obs, cfg.min_recall) and cfg.min_recall is not None:
        test = f"one-sided exact binomial test, H0: {cand.name} recall >= {cfg.min_recall:g}"
        fields = {"value": k_c / n_c if n_c else None, "limit": cfg.min_recall, "test": test}
        if (short := _too_few(cfg, {f"{cand.name} labelled frauds": n_c}, **fields)) is not None:
            return short
        p = stats.binomtest(k_c, n_c, cfg.min_recall, alternative="less").pvalue
        verdict = _decide(p < alpha, k_c / n_c >= cfg.min_recall)
        detail = f"{cand.name} recall {k_c}/{n_c} = {k_c / n_c:.4f} vs bound {cfg.min_recall:g} (p={_p(p)}): {verdict}"
        return _result(cfg, verdict, samples=n_c, p_value=p, detail=detail, **fields)
    base = obs.baseline
    if base is None:
        return _no_bound(cfg, cfg.max_drop, "recall vs champion")
    k_b, n_b = _recall_counts(base, obs.threshold)
    test = f"one-sided two-proportion z-test, H0: recall_{cand.name} >= {1 - cfg.max_drop:g} x recall_champion"
    fields = {
        "value": k_c / n_c if n_c else None,
        "baseline": k_b / n_b if n_b else None,
        "limit": cfg.max_drop,
        "test": test,
    }
    counts = {f"{cand.name} labelled frauds": n_c, "champion labelled frauds": n_b}
    if (short := _too_few(cfg, counts, **fields)) is not None:
        return short
    z, p = (float(v) for v in ratio_margin_test(k_c, n_c, k_b, n_b, cfg.max_drop))
    floor = (1 - cfg.max_drop) * k_b / n_b
    verdict = _decide(p < alpha, k_c / n_c >= floor)
    detail = (
        f"recall {cand.name} {k_c}/{n_c} = {k_c / n_c:.4f} vs champion {k_b}/{n_b} = {k_b / n_b:.4f}, "
        f"floor {floor:.4f} (at most {cfg.max_drop:.0%} lower), z={z:.2f} p={_p(p)}: {verdict}"
    )
    return _result(cfg, verdict, samples=min(n_c, n_b), p_value=p, detail=detail, **fields)


def online_log_loss(cfg: OnlineLogLossGuardrail, obs: Observations) -> GuardrailResult:
    """Mean log loss on labelled requests (min_samples counts labelled requests per variant). Relative: Welch's
    one-sided t-test of H0: mean_chal <= (1 + max_increase) mean_champ (the champion's losses are scaled by
    1 + max_increase, which scales their mean and variance alike); fail when rejected, pass when the observed
    mean is within the bound. Absolute (watch): one-sample t-test of H0: mean <= max_log_loss.
    value/baseline: mean log losses; limit: max_increase (watch: max_log_loss)."""
    cand, alpha = obs.candidate, 1 - cfg.confidence
    ll_c = log_losses(*cand.labelled())
    mean_c = float(ll_c.mean()) if len(ll_c) else None
    if _absolute(cfg, obs, cfg.max_log_loss) and cfg.max_log_loss is not None:
        test = f"one-sided one-sample t-test, H0: {cand.name} mean log loss <= {cfg.max_log_loss:g}"
        fields = {"value": mean_c, "limit": cfg.max_log_loss, "test": test}
        if (short := _too_few(cfg, {f"{cand.name} labelled": len(ll_c)}, **fields)) is not None:
            return short
        p = _finite_p(stats.ttest_1samp(ll_c, cfg.max_log_loss, alternative="greater").pvalue)
        verdict = _decide(p is not None and p < alpha, ll_c.mean() <= cfg.max_log_loss)
        detail = f"{cand.name} mean log loss {ll_c.mean():.4f} over {len(ll_c)} labelled vs bound {cfg.max_log_loss:g}"
        return _result(cfg, verdict, samples=len(ll_c), p_value=p, detail=f"{detail} (p={_p(p)}): {verdict}", **fields)
    base = obs.baseline
    if base is None:
        return _no_bound(cfg, cfg.max_increase, "mean log loss vs champion")
    ll_b = log_losses(*base.labelled())
    mean_b = float(ll_b.mean()) if len(ll_b) else None
    factor = 1 + cfg.max_increase
    test = f"Welch's one-sided t-test, H0: mean log loss {cand.name} <= {factor:g} x champion"
    fields = {"value": mean_c, "baseline": mean_b, "limit": cfg.max_increase, "test": test}
    counts = {f"{cand.name} labelled": len(ll_c), "champion labelled": len(ll_b)}
    if (short := _too_few(cfg, counts, **fields)) is not None:
        return short
    p = _finite_p(stats.ttest_ind(ll_c, factor * ll_b, equal_var=False, alternative="greater").pvalue)
    verdict = _decide(p is not None and p < alpha, ll_c.mean() <= factor * ll_b.mean())
    detail = (
        f"mean log loss {cand.name} {ll_c.mean():.4f} vs champion {ll_b.mean():.4f} x {factor:g} = "
        f"{factor * ll_b.mean():.4f} ({len(ll_c)} vs {len(ll_b)} labelled, p={_p(p)}): {verdict}"
    )
    return _result(cfg, verdict, samples=min(len(ll_c), len(ll_b)), p_value=p, detail=detail, **fields)


def _finite_p(p: Any) -> float | None:
    """A t-test on constant samples has no p-value (NaN): no evidence either way."""
    return float(p) if np.isfinite(p) else None


GUARDRAILS: dict[str, Callable[[Any, Observations], GuardrailResult]] = {
    "error_rate": error_rate,
    "latency_p99": latency_p99,
    "score_shift": score_shift,
    "shadow_agreement": shadow_agreement,
    "online_recall": online_recall,
    "online_log_loss": online_log_loss,
}


def evaluate_guardrails(
    spec: RolloutSpec,
    phase_kind: str,
    predictions: pd.DataFrame,
    feedback: pd.DataFrame | None,
    *,
    threshold: float,
) -> list[GuardrailResult]:
    """Every guardrail of `spec` that applies to `phase_kind` ("shadow", "canary" or "watch"), in spec order,
    on the given window of the prediction log (the caller picks the window, e.g. the current policy
    generation) and the feedback received so far."""
    obs = observe(phase_kind, predictions, feedback, threshold=threshold)
    return [GUARDRAILS[cfg.kind](cfg, obs) for cfg in spec.guardrails if _applies(cfg, obs)]


def _applies(cfg: GuardrailConfig, obs: Observations) -> bool:
    """A guardrail applies to the phase kinds it names, except that in a canary step where the champion serves
    no request at all (the 100 % step) a purely relative guardrail (no absolute bound) has nothing to compare
    with: it is left out, so it neither blocks the step forever as "inconclusive" nor passes without evidence."""
    if obs.phase_kind not in cfg.applies_to:
        return False
    if obs.phase_kind == "canary" and obs.baseline is not None and obs.baseline.requests == 0:
        bound_name = type(cfg).WATCH_LIMIT
        return bound_name is not None and getattr(cfg, bound_name) is not None
    return True


def overall_verdict(results: list[GuardrailResult]) -> Verdict:
    """fail if any guardrail failed, pass if all passed (and there is at least one), else inconclusive."""
    return combine_verdicts(result.verdict for result in results)
