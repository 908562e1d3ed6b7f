"""Guardrails: anytime-valid checks of a challenger against the champion, from the prediction log and feedback.

`evaluate_guardrails(spec, phase_kind, predictions, feedback)` returns one `GuardrailResult` per guardrail of the
spec that applies to the phase kind. The statistics run on sufficient statistics (`Moments`: counts, sums, sums
of squares and per-cluster aggregates), so the same code judges a live window and a simulated one
(`benchmarks/guardrails.py` feeds it per-second statistics of whole simulated rollouts).

How a guardrail decides
-----------------------
Each guardrail is a contrast D between the challenger and the champion (or a bound), written so that the
challenger is acceptable when D <= 0, e.g. `recall: D = (1 - max_drop) recall_champion - recall_challenger`. At
every look it computes two one-sided anytime-valid bounds for D (`confidence_bounds`), and

- **fails** when the lower bound lies beyond the margin (lower > 0),
- **passes** only when the upper bound lies within it (upper <= 0),
- is **inconclusive** otherwise, and always below its `min_samples`.

Construction (`one_sided_boundary`): each bound is where an e-process reaches 1/level (Ville's inequality): a
fixed bet at the planned effect (the likelihood ratio of the SPRT, Wald 1945) mixed with two of Robbins'
one-sided normal mixtures (Howard, Ramdas, McAuliffe & Sekhon, Ann. Statist. 2021), applied to the estimate's
Gaussian approximation in intrinsic time I = 1 / Var(estimate): the asymptotic confidence sequences of
Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas ("Time-uniform central limit theory and asymptotic confidence
sequences", Ann. Statist. 2024). The fail side is tuned for the planned bad challenger (one margin beyond; for
recall, a 20 % drop), the pass side for a challenger one margin inside. For two independent arms the
variances add (per-arm n); for paired data (shadow: both models score the same request) the bounds are on the
per-request differences, whose variance is far smaller. Any tuning fixed before the data keeps the guarantee.

Assumptions, stated: (1) observations are independent given their cluster (an account, for sticky routing; a
second of arrival, for batched shadow calls), with finite variance; the variance is the cluster-robust one from
per-cluster aggregates, floored at one pseudo-observation so an all-zero sample has a width; (2) the guarantee
is asymptotic (it holds as the first look's sample grows; `min_samples` is that first look); (3) labels are
missing at random given the request (late, not selectively); (4) the two arms' sample sizes grow in a fixed
ratio within a phase (the canary weight); (5) p99 latency compares the challenger's share of requests above the
champion's running p99 with `max_ratio_exceedance` x the champion's own share there; the threshold is estimated
from the champion, so the guarantee is for the contrast at the threshold the champion's data picks.

Error budget (`error_budget`, `Levels`)
---------------------------------------
Only failing costs false rollbacks. The spec's `false_rollback_rate` (default 1 %) is split over every
(guardrail, phase) pair that can be judged, the post-promotion watch included, in proportion to each
guardrail's `budget_weight` (weighted Bonferroni); a guardrail with several contrasts (decline rate and score
shift are two-sided, score shift has two edges) splits its fail share again. The pass side runs at the spec's
`false_promotion_rate` (default 5 %), unsplit: a challenger beyond one guardrail's margin must pass that
guardrail to be promoted. A bound holds at every look at once, so looking more often cannot raise either rate;
`failure_limit` consecutive failed analyses are needed on top. A phase that cannot gather evidence before its
`max_duration_s` rolls back by its deadline: the planner (`monitoring.rollout.planner`) sizes deadlines so a
good challenger meets them at the spec's planning rate, and the benchmark measures it.

Who is compared with whom (`observe`)
-------------------------------------
- shadow (and replay, whose replayed answers are laid out as shadow rows: `monitoring.rollout.replay`): pairs
  only, the champion's answer and the challenger's shadow answer on the same request
  (`dropped`/`cancelled`/`other_version` shadow calls are the gateway's doing and are left out; `error` counts
  as a challenger error). Error rate, decline rate, score shift, agreement, recall and log loss are paired.
- canary: rows routed to the challenger (plus `status == "fallback"` rows: the challenger failed and the
  champion answered, so they are challenger errors whose score is not used) vs rows the champion answered.
- watch (after promotion): the champion's rows alone, against each guardrail's absolute bound.
- rows answered by the default rule (`status == "degraded"`: the budget ran out or the gateway shed the request)
  are evidence against neither variant and left out of every phase.
At the 100 % step (a canary phase of weight 1, or any canary phase where the champion has fewer than
`min_samples` requests) a guardrail with an absolute bound is held to it instead; a purely relative one is left
out there. The weight decides, not only the champion's count: at 100 % the champion gets no new traffic, so the
rows it has are leftovers answered before the gateways applied the step's policy (a controller that hung between
recording the step and writing the policy leaves seconds of them). Their count can exceed `min_samples` and
never grows, so a relative test against them could never resolve its margin (seen in `fault-controller-hang`:
188 champion rows, the error-rate guardrail inconclusive until the step's deadline rolled a healthy challenger
back).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from core.prediction_log import (
    ACCOUNT_ID,
    AMOUNT,
    LABEL,
    LATENCY_MS,
    RECEIVED_AT,
    REQUEST_ID,
    SCORE,
    SHADOW_PREFIX,
    SHADOW_STATUS,
    STATUS,
    TS,
    VARIANT,
    without_degraded,
)
from core.schema import CATEGORICAL_FEATURES
from monitoring.rollout.spec import (
    DeclineRateGuardrail,
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

PHASE_KINDS = ("replay", "shadow", "canary", "watch")
LOG_LOSS_CLIP = 1e-6  # scores of exactly 0 or 1 cost at most -log(1e-6) = 13.8 nats
CS_NAME = (
    "one-sided asymptotic confidence sequences (an e-process: fixed bet, Wald 1945, plus normal mixture, Howard et al."
    " 2021; Waudby-Smith et al. 2024)"
)
FAIL, INCONCLUSIVE, PASS = -1, 0, 1
PROPORTION_PSEUDO = 1.0
# A change in the mass of a score region of under 0.2 % of the traffic is never a regression: without this
# slack a region both models leave empty (D = 0 exactly) could never pass.
MASS_SLACK = 0.002
_CODE_VERDICT: dict[int, Verdict] = {FAIL: "fail", INCONCLUSIVE: "inconclusive", PASS: "pass"}
# Logged request columns carried into the arms for the slice and business guardrails (slice_guardrails.py).
SLICE_LOGGED: tuple[str, ...] = (*CATEGORICAL_FEATURES, AMOUNT)


# ---------------------------------------------------------------- sufficient statistics


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a mean over rows grouped in clusters; fields are floats or numpy arrays
    (one entry per simulated rollout and look: everything below is elementwise).

    n = rows, s = sum x, ss = sum x^2; css = sum over clusters of (cluster sum)^2, csn = sum of cluster sum x
    cluster size, cnn = sum of cluster size^2. With one row per cluster, css = ss, csn = s, cnn = n."""

    n: Any
    s: Any
    ss: Any
    css: Any
    csn: Any
    cnn: Any
    pseudo: float = 0.0  # for a proportion: pseudo-events added to each side in the variance floor (below)

    @classmethod
    def of(cls, values: np.ndarray, clusters: np.ndarray | None = None, pseudo: float = 0.0) -> Moments:
        x = np.asarray(values, dtype=float)
        if clusters is None or len(x) == 0:
            return cls(float(len(x)), float(x.sum()), float((x * x).sum()), float((x * x).sum()), float(x.sum()),
                       float(len(x)), pseudo)  # fmt: skip
        _, index = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
        sums, sizes = np.bincount(index, weights=x), np.bincount(index).astype(float)
        return cls(float(len(x)), float(x.sum()), float((x * x).sum()), float((sums * sums).sum()),
                   float((sums * sizes).sum()), float((sizes * sizes).sum()), pseudo)  # fmt: skip

    @classmethod
    def proportion(cls, events: np.ndarray, clusters: np.ndarray | None = None) -> Moments:
        """Moments of a 0/1 indicator, with a variance floor of one pseudo-event a side."""
        return cls.of(events, clusters, pseudo=PROPORTION_PSEUDO)

    def __add__(self, other: Moments) -> Moments:
        fields = ("n", "s", "ss", "css", "csn", "cnn")
        return Moments(*(getattr(self, f) + getattr(other, f) for f in fields), pseudo=self.pseudo)

    @property
    def mean(self) -> Any:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(np.asarray(self.n) > 0, np.asarray(self.s) / np.maximum(self.n, 1), np.nan)

    def variance_of_mean(self) -> Any:
        """Cluster-robust (sandwich) variance of the ratio estimator s / n, floored at 1 / (n + 1)^2 (one
        pseudo-observation of unit variance), so a sample without events still has a width; for a proportion
        (`pseudo` > 0) floored at p~(1 - p~) / n with p~ = (s + pseudo) / (n + 2 pseudo), which keeps rare events
        (a 1-2 % error or decline rate at a few hundred requests) from a too-narrow plug-in variance."""
        n = np.maximum(np.asarray(self.n, dtype=float), 1.0)
        m = np.nan_to_num(self.mean)
        robust = (np.asarray(self.css) - 2 * m * np.asarray(self.csn) + m * m * np.asarray(self.cnn)) / (n * n)
        floor = 1.0 / (n + 1.0) ** 2
        if self.pseudo > 0:
            p = np.clip((np.asarray(self.s) + self.pseudo) / (n + 2 * self.pseudo), 0.0, 1.0)
            floor = np.maximum(floor, p * (1 - p) / n)
        return np.maximum(robust, floor)


@dataclass(frozen=True)
class Levels:
    """The two error rates one guardrail is judged at in one phase.

    fail: its share of the spec's `false_rollback_rate` (`error_budget`): a challenger within the margin makes
    the guardrail fail, at any look of the phase, with probability at most this. pass_: the spec's
    `false_promotion_rate`: a challenger beyond the margin makes it pass, at any look, with probability at most
    this. Only failing costs false rollbacks, so only the fail level is split across guardrails and phases; a
    challenger beyond one guardrail's margin must pass that guardrail to be promoted, so the pass level needs
    no split."""

    fail: float
    pass_: float

    def split(self, parts: int) -> Levels:
        """For `parts` contrasts of which any one failing fails the guardrail and all must pass to pass it."""
        return Levels(self.fail / parts, self.pass_)


# The e-process's parts: a fixed bet at the planned effect, and two normal mixtures over bets, one tuned for half the
# planned effect (smaller effects are still caught) and one for 8x it (much larger ones are caught at once).
BET_WEIGHT = 0.7
PASS_TUNING = 1.0  # the pass side is tuned for a challenger this many margins inside (an identical one: 1)
MIXTURES = ((0.15, 0.5), (0.15, 8.0))  # (weight, effect it is tuned for, relative to the planned effect)


def _optimal_ratio(log_inverse_level: float) -> float:
    """c = I*/r minimising the normal-mixture boundary's width at I* (Howard et al. 2021, eq. (3.12)'s tuning)."""
    c = np.exp(np.linspace(0.0, 6.0, 601))
    width = (1 + 1 / c) * (np.log1p(c) + log_inverse_level)
    return float(c[np.argmin(width)])


@functools.lru_cache(maxsize=512)
def _boundary_grid(alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """For unit effect: log u on a grid of dimensionless information u = I effect^2, and s*(u)/u, where s* is the
    smallest s = S effect (S = I x estimate) at which the e-process reaches 1/alpha (see `one_sided_boundary`)."""
    log_u = np.linspace(np.log(1e-6), np.log(1e9), 1500)  # s*/u is smooth in log u: interpolated between points
    u = np.exp(log_u)
    target = np.log(1 / alpha)
    mixtures = []
    for weight, relative in MIXTURES:
        # tightest where a bet of that size would cross: u = 2 log(1/(w alpha)) / relative^2
        at = 2 * np.log(1 / (weight * alpha)) / relative**2
        mixtures.append((weight, at / _optimal_ratio(2 * np.log(1 / (weight * alpha)))))

    def log_e(s: np.ndarray) -> np.ndarray:
        total = np.log(BET_WEIGHT) + s - u / 2  # the likelihood ratio of N(effect, 1/I) to N(0, 1/I)
        for weight, r in mixtures:  # Robbins' half-normal mixture over bets lambda > 0, precision r (one-sided)
            mixture = (
                np.log(weight) + np.log(2) + 0.5 * np.log(r / (u + r)) + s * s / (2 * (u + r))
                + special.log_ndtr(s / np.sqrt(u + r))
            )  # fmt: skip
            total = np.logaddexp(total, mixture)
        return total

    lo, hi = np.zeros_like(u), u / 2 + np.log(1 / (BET_WEIGHT * alpha))  # the bet alone crosses by hi
    for _ in range(80):  # bisection: the bracket shrinks to 2^-80 of its width
        mid = (lo + hi) / 2
        above = log_e(mid) >= target
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    return log_u, hi / u


def one_sided_boundary(information: Any, alpha: float, effect: float) -> Any:
    """Half-width b of a one-sided (1 - alpha) anytime-valid bound: P(exists a look: estimate - D >= b) <= alpha
    when the estimate is Gaussian around D with variance 1/`information` (asymptotically, WS et al. 2024).

    In intrinsic time (V = I, S = I (estimate - D)) the bound is where a nonnegative supermartingale, the
    e-process E = w0 exp(lambda S - lambda^2 V / 2) + w1 M1 + w2 M2, reaches 1/alpha (Ville's inequality):
    - the first term is a fixed bet lambda = `effect`, the likelihood ratio against an effect of that size (the
      SPRT's statistic; Wald 1945): the fastest to cross when the effect is what was planned;
    - M1, M2 are Robbins' one-sided normal mixtures over lambda > 0 (Howard, Ramdas, McAuliffe & Sekhon, Ann.
      Statist. 2021), tuned for half and 8x the planned effect, so the bound still shrinks to 0 for smaller
      effects and reacts quickly to much larger ones.
    Weights `BET_WEIGHT`, `MIXTURES`. A mixture of e-processes is one, so any fixed `effect` keeps the guarantee;
    it is chosen before any data (from the margin)."""
    information = np.maximum(np.asarray(information, dtype=float), 1e-300)
    effect = max(float(effect), 1e-12)
    log_u, ratio = _boundary_grid(float(alpha))
    return effect * np.interp(np.log(information * effect * effect), log_u, ratio)


def confidence_bounds(
    estimate: Any, variance: Any, levels: Levels, scale: float, fail_scale: float | None = None
) -> tuple[Any, Any]:
    """(lower, upper) of D with Var(estimate) = `variance`: the lower bound holds at every look with probability
    1 - levels.fail, tuned for the planned bad effect `fail_scale` (default: one margin beyond, D = `scale`);
    the upper bound with 1 - levels.pass_, tuned for a challenger one margin inside (an identical one; the
    mixtures cover half and 8x that). `scale`: the margin in units of D. Elementwise."""
    information = 1.0 / np.maximum(np.asarray(variance, dtype=float), 1e-300)
    estimate = np.asarray(estimate, dtype=float)
    lower = estimate - one_sided_boundary(information, levels.fail, scale if fail_scale is None else fail_scale)
    upper = estimate + one_sided_boundary(information, levels.pass_, PASS_TUNING * scale)
    return lower, upper


@dataclass(frozen=True)
class Judgement:
    """One contrast judged: estimate and CS of D (acceptable when D <= 0) and the verdict code."""

    estimate: Any
    lower: Any
    upper: Any
    code: Any


def judge(
    estimate: Any, variance: Any, levels: Levels, scale: float, enough: Any = True, fail_scale: float | None = None
) -> Judgement:
    """fail where the lower bound is above 0, pass where the upper bound is at or below 0, else inconclusive;
    inconclusive wherever `enough` is false (below min_samples) or the estimate is undefined. `scale`: the
    margin in units of D (the effect the boundaries are tuned for)."""
    lower, upper = confidence_bounds(estimate, variance, levels, scale, fail_scale)
    defined = np.isfinite(np.asarray(estimate, dtype=float)) & np.asarray(enough)
    code = np.where(defined & (lower > 0), FAIL, np.where(defined & (upper <= 0), PASS, INCONCLUSIVE))
    return Judgement(estimate, lower, upper, code)


def combine_codes(*judgements: Judgement) -> Any:
    """fail if any contrast fails, pass if all pass, else inconclusive (elementwise)."""
    codes = np.stack([np.asarray(j.code) for j in judgements])
    return np.where((codes == FAIL).any(axis=0), FAIL, np.where((codes == PASS).all(axis=0), PASS, INCONCLUSIVE))


def judged_pairs(spec: RolloutSpec) -> list[tuple[str, str]]:
    """Every (phase name, guardrail name) judged over a rollout: each phase, plus the watch when it lasts."""
    phases = [(phase.name, phase.kind) for phase in spec.phases]
    if spec.post_promotion_watch_s > 0:
        phases.append(("watch", "watch"))
    # External guardrails (Prometheus) judge point estimates, with no share of the budget to spend.
    return [
        (name, cfg.name) for name, kind in phases for cfg in spec.guardrails_for(kind) if cfg.kind not in EXTERNAL_KINDS
    ]


def error_budget(spec: RolloutSpec) -> dict[str, float]:
    """Fail level per guardrail (in each phase it is judged in): `false_rollback_rate` split over the judged
    (guardrail, phase) pairs in proportion to each guardrail's `budget_weight` (a weighted Bonferroni split, so
    the levels of all pairs add up to the rollout-level rate)."""
    weights = {cfg.name: cfg.budget_weight for cfg in spec.guardrails}
    total = sum(weights[name] for _, name in judged_pairs(spec))
    return {name: spec.false_rollback_rate * weight / max(total, 1e-12) for name, weight in weights.items()}


def levels_for(spec: RolloutSpec, cfg: GuardrailConfig) -> Levels:
    """The levels `cfg` is judged at in every phase it applies to (see `Levels`)."""
    return Levels(error_budget(spec)[cfg.name], spec.false_promotion_rate)


# ---------------------------------------------------------------- contrasts on sufficient statistics


def difference(cand: Moments, base: Moments | None, factor: float, offset: float) -> tuple[Any, Any]:
    """D = mean_c - factor mean_b - offset (independent arms; base None: D = mean_c - offset), Var(D)."""
    if base is None:
        return cand.mean - offset, cand.variance_of_mean()
    return cand.mean - factor * base.mean - offset, cand.variance_of_mean() + factor**2 * base.variance_of_mean()


def paired(d: Moments, offset: float = 0.0) -> tuple[Any, Any]:
    """D = mean of the per-request differences d - offset (paired), Var(D)."""
    return d.mean - offset, d.variance_of_mean()


def two_sided_ratio(
    estimate_hi: tuple[Any, Any], estimate_lo: tuple[Any, Any], levels: Levels, scale: float, enough: Any
) -> tuple[Judgement, Judgement]:
    """A ratio kept in [1 - m, 1 + m]: the contrasts c - (1 + m) b <= 0 and (1 - m) b - c <= 0. Either can fail,
    so each fails at half the fail level; both must pass, so each passes at the whole pass level."""
    half = levels.split(2)
    return judge(*estimate_hi, half, scale, enough), judge(*estimate_lo, half, scale, enough)


# ---------------------------------------------------------------- what the log holds, per phase


@dataclass(frozen=True)
class GuardrailResult:
    """The outcome of one guardrail on one analysis. `lower`/`upper`: the CS of its contrast D (acceptable
    when D <= 0); `confidence`: the CS's level, 1 - its share of the spec's false_rollback_rate."""

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
    lower: float | None = None
    upper: float | None = None
    # A slice guardrail's failing (else worst) slice, e.g. "merchant_category=electronics": the decision names it.
    slice: str | None = None

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
    account: np.ndarray  # the sticky routing key: the cluster of a request
    # Logged request columns the slice and business guardrails read (`SLICE_LOGGED`), one entry per request.
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.error)

    def labelled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, label, account) of the requests that have both a score and a label."""
        keep = np.isfinite(self.score) & np.isfinite(self.label)
        return self.score[keep], self.label[keep], self.account[keep]


@dataclass(frozen=True)
class Pairs:
    """Shadow: the requests scored (or failed) by both models. `scores` (n, 2) are (champion, challenger)
    where both answered; `error` (m, 2) over every shadowed request; `second` clusters batched shadow calls."""

    scores: np.ndarray
    label: np.ndarray
    account: np.ndarray
    error: np.ndarray
    second: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # as Arm.columns, for the scored pairs


@dataclass(frozen=True)
class Observations:
    """What the guardrails of one phase kind look at: the candidate, the champion baseline (none in watch),
    and in shadow the pairs."""

    phase_kind: str
    candidate: Arm
    baseline: Arm | None
    pairs: Pairs | None
    threshold: float
    weight: float | None = None  # the canary phase's traffic weight, when the caller knows it

    @property
    def full_step(self) -> bool:
        """A canary step whose champion gets no new traffic: weight 1 (its rows are leftovers from before the
        gateways applied the step), or, without a weight, no champion row at all."""
        if self.phase_kind != "canary" or self.baseline is None:
            return False
        return self.baseline.requests == 0 if self.weight is None else self.weight >= 1.0


def _column(frame: pd.DataFrame, name: str, dtype: str = "object") -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series(np.full(len(frame), None), index=frame.index, dtype=dtype)


def _floats(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _labels(predictions: pd.DataFrame, feedback: pd.DataFrame | None) -> pd.Series:
    """Label per prediction row (NaN where none): the latest feedback per request_id, 0/1 only."""
    if feedback is None or feedback.empty or LABEL not in feedback.columns or REQUEST_ID not in predictions:
        return pd.Series(np.nan, index=predictions.index)
    latest = feedback.sort_values(RECEIVED_AT, kind="stable") if RECEIVED_AT in feedback.columns else feedback
    latest = latest.drop_duplicates(REQUEST_ID, keep="last").set_index(REQUEST_ID)[LABEL]
    label = pd.to_numeric(predictions[REQUEST_ID].map(latest), errors="coerce")
    return label.where(label.isin([0, 1]))


def _accounts(rows: pd.DataFrame) -> np.ndarray:
    if ACCOUNT_ID in rows.columns:
        return rows[ACCOUNT_ID].astype(str).to_numpy()
    return np.arange(len(rows)).astype(str)  # no key: every request its own cluster


def _arm(name: str, rows: pd.DataFrame, label: pd.Series, prefix: str = "") -> Arm:
    status = _column(rows, f"{prefix}{STATUS}").astype("object")
    ok = (status == "ok").to_numpy()
    score = _floats(_column(rows, f"{prefix}{SCORE}", "float64"))
    return Arm(
        name=name,
        error=~ok,
        latency_ms=_floats(_column(rows, f"{prefix}{LATENCY_MS}", "float64")),
        score=np.where(ok, score, np.nan),
        label=label.loc[rows.index].to_numpy(dtype=float, na_value=np.nan),
        account=_accounts(rows),
        columns={name: rows[name].to_numpy() for name in SLICE_LOGGED if name in rows.columns},
    )


def observe(
    phase_kind: str,
    predictions: pd.DataFrame,
    feedback: pd.DataFrame | None,
    *,
    threshold: float,
    weight: float | None = None,
) -> Observations:
    """Split the prediction log into the arms a phase compares (see the module docstring); `weight`: the canary
    phase's traffic weight (1.0 at the 100 % step), None when unknown."""
    if phase_kind not in PHASE_KINDS:
        raise ValueError(f"phase_kind must be one of {', '.join(PHASE_KINDS)}, got {phase_kind!r}")
    frame = without_degraded(predictions).reset_index(drop=True)  # answered by the rule: evidence against neither
    label = _labels(frame, feedback)
    variant, status = _column(frame, VARIANT), _column(frame, STATUS)
    challenger_rows = (variant == "challenger") | (status == "fallback")
    champion = _arm("champion", frame[(variant == "champion") & ~challenger_rows], label)
    if phase_kind == "watch":
        return Observations(phase_kind, champion, None, None, threshold)
    if phase_kind == "canary":
        challenger = _arm("challenger", frame[challenger_rows], label)
        return Observations(phase_kind, challenger, champion, None, threshold, weight)
    shadowed = frame[(variant == "champion") & ~challenger_rows & _column(frame, SHADOW_STATUS).isin(["ok", "error"])]
    shadow = _arm("shadow", shadowed, label, prefix=SHADOW_PREFIX)
    own = _arm("champion", shadowed, label)
    both = np.isfinite(own.score) & np.isfinite(shadow.score)
    ts = _floats(_column(shadowed, TS, "float64"))
    pairs = Pairs(
        scores=np.column_stack([own.score[both], shadow.score[both]]),
        label=own.label[both],
        account=own.account[both],
        error=np.column_stack([own.error, shadow.error]).astype(float),
        second=np.nan_to_num(np.floor(ts), nan=-1.0).astype(str),
        columns={name: values[both] for name, values in own.columns.items()},
    )
    return Observations(phase_kind, shadow, champion, pairs, threshold)


# ---------------------------------------------------------------- guardrails


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


def _result(
    cfg: GuardrailConfig, levels: Levels, code: int, judged: Judgement | None, test: str, **fields: Any
) -> GuardrailResult:
    verdict = _CODE_VERDICT[int(code)]
    lower = upper = None
    if judged is not None:
        lower, upper = _num(judged.lower), _num(judged.upper)
    return GuardrailResult(
        name=cfg.name,
        verdict=verdict,
        value=_num(fields.get("value")),
        baseline=_num(fields.get("baseline")),
        limit=float(fields["limit"]),
        samples=int(fields["samples"]),
        min_samples=cfg.min_samples,
        test=f"{test}; {CS_NAME}; fails at level {levels.fail:.3g}, passes at {levels.pass_:.3g}",
        confidence=1 - levels.fail,
        p_value=None,
        detail=f"{fields['detail']}: {verdict}",
        lower=lower,
        upper=upper,
    )


def _cs(judged: Judgement) -> str:
    return f"CS of D [{float(judged.lower):+.4g}, {float(judged.upper):+.4g}] (acceptable when D <= 0)"


def _absolute(cfg: GuardrailConfig, obs: Observations, bound: float | None) -> bool:
    """Whether to hold the candidate to the absolute bound, when one is configured: in watch, at the 100 % step
    (`Observations.full_step`), and in a canary phase whose champion has fewer than min_samples requests."""
    if bound is None:
        return False
    if obs.baseline is None or obs.full_step:
        return True
    return obs.phase_kind == "canary" and obs.baseline.requests < cfg.min_samples


def _short(counts: dict[str, int], minimum: int) -> str:
    short = {arm: n for arm, n in counts.items() if n < minimum}
    return ", ".join(f"{arm} has {n}" for arm, n in short.items())


def _too_few(cfg: GuardrailConfig, levels: Levels, test: str, counts: dict[str, int], **fields: Any) -> GuardrailResult:
    detail = f"too few samples: {_short(counts, cfg.min_samples)} < {cfg.min_samples}"
    return _result(cfg, levels, INCONCLUSIVE, None, test, samples=min(counts.values()), detail=detail, **fields)


def error_rate(cfg: ErrorRateGuardrail, obs: Observations, levels: Levels) -> GuardrailResult:
    """Error rate. Relative: D = p_challenger - p_champion - max_increase; paired per request in shadow
    (clustered by second of arrival: one failed batch call fails up to a batch of requests at once; the log has
    no batch id, so the variance, not the count, absorbs it), two independent arms clustered by account in a
    canary. Absolute (watch, or a canary step with no champion): D = p - max_rate.
    value/baseline: error rates; limit: max_increase (absolute: max_rate)."""
    cand = obs.candidate
    if _absolute(cfg, obs, cfg.max_rate) and cfg.max_rate is not None:
        test = f"{cand.name} error rate <= {cfg.max_rate:g}"
        m = Moments.proportion(cand.error.astype(float), cand.account)
        fields = {"value": m.mean, "limit": cfg.max_rate}
        if cand.requests < cfg.min_samples:
            return _too_few(cfg, levels, test, {cand.name: cand.requests}, **fields)
        judged = judge(*difference(m, None, 0, cfg.max_rate), levels, max(cfg.max_rate / 2, 1e-3))
        detail = f"{cand.name} errors {int(m.s)}/{int(m.n)} = {float(m.mean):.4f}; {_cs(judged)}"
        return _result(cfg, levels, judged.code, judged, test, samples=cand.requests, detail=detail, **fields)
    base = obs.baseline
    test = f"p_{cand.name} - p_champion <= {cfg.max_increase:g}"
    if base is None:
        return _no_bound(cfg, levels, cfg.max_increase, test)
    scale = max(cfg.max_increase, 1e-3)
    if obs.pairs is not None:
        err = obs.pairs.error
        n = len(err)
        fields = {"value": err[:, 1].mean() if n else None, "baseline": err[:, 0].mean() if n else None}
        fields["limit"] = cfg.max_increase
        if n < cfg.min_samples:
            return _too_few(cfg, levels, test, {"shadowed requests": n}, **fields)
        judged = judge(*paired(Moments.of(err[:, 1] - err[:, 0], obs.pairs.second), cfg.max_increase), levels, scale)
        detail = f"paired over {n} shadowed requests: errors {int(err[:, 1].sum())} vs champion {int(err[:, 0].sum())}"
        return _result(cfg, levels, judged.code, judged, test, samples=n, detail=f"{detail}; {_cs(judged)}", **fields)
    mc, mb = (
        Moments.proportion(cand.error.astype(float), cand.account),
        Moments.proportion(base.error.astype(float), base.account),
    )
    fields = {"value": mc.mean, "baseline": mb.mean, "limit": cfg.max_increase}
    if min(cand.requests, base.requests) < cfg.min_samples:
        return _too_few(cfg, levels, test, {cand.name: cand.requests, "champion": base.requests}, **fields)
    judged = judge(*difference(mc, mb, 1.0, cfg.max_increase), levels, scale)
    detail = (
        f"{cand.name} errors {int(mc.s)}/{int(mc.n)} = {float(mc.mean):.4f} vs champion {int(mb.s)}/{int(mb.n)} = "
        f"{float(mb.mean):.4f}; {_cs(judged)}"
    )
    return _result(cfg, levels, judged.code, judged, test, samples=min(cand.requests, base.requests), detail=detail,
                   **fields)  # fmt: skip


def _no_bound(cfg: GuardrailConfig, levels: Levels, limit: float, test: str) -> GuardrailResult:
    detail = "no champion to compare with and no absolute bound configured"
    return _result(cfg, levels, INCONCLUSIVE, None, test, samples=0, limit=limit, detail=detail)


def latency_tail_judgement(
    cand_above: Moments, base_above: Moments | None, ratio: float, levels: Levels, enough: Any
) -> Judgement:
    """Relative: D = share of challenger requests above the champion's running p99 - ratio x the champion's
    share there (~0.01). Var(D) = Var(challenger share) + Var(champion share): the champion's share at its own
    empirical p99 is fixed by construction, and the threshold's sampling noise reaches the challenger's share
    like the champion's binomial noise at p99 (delta method, equal densities at the threshold: the null of an
    identical challenger). Absolute (base None): D = share above the bound - 0.01, i.e. p99 <= bound."""
    if base_above is None:
        return judge(*difference(cand_above, None, 0, 0.01), levels, 0.005, enough)
    estimate = cand_above.mean - ratio * base_above.mean
    variance = cand_above.variance_of_mean() + base_above.variance_of_mean()
    return judge(estimate, variance, levels, max(0.01 * (ratio - 1), 0.005), enough)


def latency_p99(cfg: LatencyP99Guardrail, obs: Observations, levels: Levels) -> GuardrailResult:
    """Tail latency (client-visible `latency_ms`, a fallback's included). Relative: the share of challenger
    requests slower than the champion's p99 must be at most `max_ratio_exceedance` x the champion's share (1 %).
    Absolute: p99 <= max_p99_ms. value/baseline: p99 ms; limit: the allowed share (absolute: max_p99_ms)."""
    cand = obs.candidate
    keep_c = np.isfinite(cand.latency_ms)
    lat_c, acc_c = cand.latency_ms[keep_c], cand.account[keep_c]
    p99_c = float(np.quantile(lat_c, 0.99)) if len(lat_c) else None
    if _absolute(cfg, obs, cfg.max_p99_ms) and cfg.max_p99_ms is not None:
        test = f"{cand.name} share of requests > {cfg.max_p99_ms:g} ms <= 0.01"
        fields = {"value": p99_c, "limit": cfg.max_p99_ms}
        if len(lat_c) < cfg.min_samples:
            return _too_few(cfg, levels, test, {cand.name: len(lat_c)}, **fields)
        above = Moments.proportion((lat_c > cfg.max_p99_ms).astype(float), acc_c)
        judged = latency_tail_judgement(above, None, 1.0, levels, True)
        detail = (
            f"{cand.name} p99 {p99_c:.1f} ms; {int(above.s)}/{int(above.n)} above {cfg.max_p99_ms:g} ms; {_cs(judged)}"
        )
        return _result(cfg, levels, judged.code, judged, test, samples=len(lat_c), detail=detail, **fields)
    base = obs.baseline
    share = 0.01 * cfg.max_ratio_exceedance
    test = f"share of {cand.name} requests > champion p99 <= {cfg.max_ratio_exceedance:g} x champion's share"
    if base is None:
        return _no_bound(cfg, levels, share, test)
    keep_b = np.isfinite(base.latency_ms)
    lat_b, acc_b = base.latency_ms[keep_b], base.account[keep_b]
    p99_b = float(np.quantile(lat_b, 0.99)) if len(lat_b) else None
    fields = {"value": p99_c, "baseline": p99_b, "limit": share}
    if min(len(lat_c), len(lat_b)) < cfg.min_samples:
        return _too_few(cfg, levels, test, {cand.name: len(lat_c), "champion": len(lat_b)}, **fields)
    above_c = Moments.proportion((lat_c > p99_b).astype(float), acc_c)
    above_b = Moments.proportion((lat_b > p99_b).astype(float), acc_b)
    judged = latency_tail_judgement(above_c, above_b, cfg.max_ratio_exceedance, levels, True)
    detail = (
        f"{cand.name} p99 {p99_c:.1f} ms vs champion p99 {p99_b:.1f} ms; above it: {cand.name} "
        f"{int(above_c.s)}/{int(above_c.n)}, champion {int(above_b.s)}/{int(above_b.n)}; {_cs(judged)}"
    )
    return _result(cfg, levels, judged.code, judged, test, samples=min(len(lat_c), len(lat_b)), detail=detail,
                   **fields)  # fmt: skip


def mass_change_judgement(
    cand: Moments | None, base: Moments | None, diff_hi: Moments | None, diff_lo: Moments | None,
    max_change: float, levels: Levels, scale: float, enough: Any,
) -> tuple[Judgement, Judgement]:  # fmt: skip
    """The share of scores at or above an edge kept within [1 - m, 1 + m] x the champion's, give or take
    MASS_SLACK. Paired (shadow): `diff_hi` holds per request c - (1 + m) b and `diff_lo` (1 - m) b - c for the
    indicators c, b; unpaired: the two arms' indicator moments. Two contrasts (`two_sided_ratio`)."""
    if diff_hi is not None and diff_lo is not None:
        return two_sided_ratio(paired(diff_hi, MASS_SLACK), paired(diff_lo, MASS_SLACK), levels, scale, enough)
    assert cand is not None and base is not None
    hi = difference(cand, base, 1 + max_change, MASS_SLACK)
    lo_est, lo_var = difference(cand, base, 1 - max_change, -MASS_SLACK)
    return two_sided_ratio(hi, (-lo_est, lo_var), levels, scale, enough)


def _region_moments(obs: Observations, edge: float, m: float) -> tuple[dict[str, Any], int, float, float]:
    """Moments for the share at or above `edge`: paired in shadow, per arm in a canary."""
    if obs.pairs is not None:
        c = (obs.pairs.scores[:, 1] >= edge).astype(float)
        b = (obs.pairs.scores[:, 0] >= edge).astype(float)
        acc = obs.pairs.account
        args = {"cand": None, "base": None, "diff_hi": Moments.of(c - (1 + m) * b, acc),
                "diff_lo": Moments.of((1 - m) * b - c, acc)}  # fmt: skip
        n = len(c)
        return args, n, float(c.mean()) if n else math.nan, float(b.mean()) if n else math.nan
    assert obs.baseline is not None
    cand, base = obs.candidate, obs.baseline
    ok_c, ok_b = np.isfinite(cand.score), np.isfinite(base.score)
    c, b = (cand.score[ok_c] >= edge).astype(float), (base.score[ok_b] >= edge).astype(float)
    args = {"cand": Moments.proportion(c, cand.account[ok_c]), "base": Moments.proportion(b, base.account[ok_b]),
            "diff_hi": None, "diff_lo": None}  # fmt: skip
    return args, min(len(c), len(b)), float(c.mean()) if len(c) else math.nan, float(b.mean()) if len(b) else math.nan


def decline_rate(cfg: DeclineRateGuardrail, obs: Observations, levels: Levels) -> GuardrailResult:
    """Decline rate (share of scores >= the decision threshold; no labels needed): the challenger's within
    [1 - max_change, 1 + max_change] x the champion's. Paired per request in shadow, two arms in a canary.
    value/baseline: decline rates; limit: max_change."""
    test = f"decline rate within {cfg.max_change:.0%} of the champion's"
    if obs.baseline is None:
        return _no_bound(cfg, levels, cfg.max_change, test)
    args, n, c, b = _region_moments(obs, obs.threshold, cfg.max_change)
    fields = {"value": c, "baseline": b, "limit": cfg.max_change}
    if n < cfg.min_samples:
        return _too_few(cfg, levels, test, {"scores": n}, **fields)
    hi, lo = mass_change_judgement(**args, max_change=cfg.max_change, levels=levels, scale=0.02 * cfg.max_change,
                                   enough=True)  # fmt: skip
    code = combine_codes(hi, lo)
    detail = f"declines {c:.4f} vs champion {b:.4f} over {n} scores; rise {_cs(hi)}; drop {_cs(lo)}"
    return _result(cfg, levels, code, hi if hi.code == FAIL or lo.code != FAIL else lo, test, samples=n,
                   detail=detail, **fields)  # fmt: skip


def score_edges(threshold: float) -> tuple[float, float]:
    """The decision-region edges that score shift judges, around the decision threshold."""
    return threshold / 2, min(2 * threshold, 0.999)


def score_shift(cfg: ScoreShiftGuardrail, obs: Observations, levels: Levels) -> GuardrailResult:
    """Score shift in the decision region: the share of scores >= threshold/2 and >= 2 x threshold each within
    [1 - max_mass_change, 1 + max_mass_change] x the champion's (4 contrasts: each fails at a quarter of the fail
    level); paired in shadow.
    value: PSI over `bins` champion-quantile bins plus the edges threshold/2, threshold, 2 x threshold,
    reported, not judged (a shift where no decision changes is no regression); limit: max_mass_change."""
    test = f"share of scores >= threshold/2 and >= 2 x threshold within {cfg.max_mass_change:.0%} of the champion's"
    if obs.baseline is None:
        return _no_bound(cfg, levels, cfg.max_mass_change, test)
    judgements: list[Judgement] = []
    parts: list[str] = []
    n = 0
    for edge in score_edges(obs.threshold):
        args, n, c, b = _region_moments(obs, edge, cfg.max_mass_change)
        if n < cfg.min_samples:
            return _too_few(cfg, levels, test, {"scores": n}, limit=cfg.max_mass_change)
        pair = mass_change_judgement(**args, max_change=cfg.max_mass_change, levels=levels.split(2),
                                     scale=0.02 * cfg.max_mass_change, enough=True)  # fmt: skip
        judgements += pair
        parts.append(f">= {edge:g}: {c:.4f} vs champion {b:.4f}")
    if obs.pairs is not None:
        s_c, s_b = obs.pairs.scores[:, 1], obs.pairs.scores[:, 0]
    else:
        assert obs.baseline is not None
        s_c = obs.candidate.score[np.isfinite(obs.candidate.score)]
        s_b = obs.baseline.score[np.isfinite(obs.baseline.score)]
    psi = population_stability_index(s_b, s_c, cfg.bins, extra_edges=(*score_edges(obs.threshold), obs.threshold))
    code = combine_codes(*judgements)
    worst = max(judgements, key=lambda j: float(j.lower))
    detail = f"{'; '.join(parts)} over {n} scores; PSI {psi:.4f} (reported); worst {_cs(worst)}"
    return _result(cfg, levels, code, worst, test, value=psi, samples=n, limit=cfg.max_mass_change, detail=detail)


def shadow_agreement(cfg: ShadowAgreementGuardrail, obs: Observations, levels: Levels) -> GuardrailResult:
    """Chance-corrected agreement on the pairs: the overlap of the two decline sets (of the requests either
    model declines, the share both decline) must be >= min_decline_overlap. D = min - overlap, a proportion
    over the requests either declines, clustered by account. Cohen's kappa is reported in the detail.
    value: overlap; limit: min_decline_overlap."""
    test = f"overlap of the decline sets >= {cfg.min_decline_overlap:g}"
    if obs.pairs is None:
        return _result(cfg, levels, INCONCLUSIVE, None, test, samples=0, limit=cfg.min_decline_overlap,
                       detail="no paired decisions outside shadow")  # fmt: skip
    dec = obs.pairs.scores >= obs.threshold
    either = dec.any(axis=1)
    both = dec.all(axis=1)
    n = len(dec)
    m = Moments.proportion(both[either].astype(float), obs.pairs.account[either])
    fields = {"value": m.mean if m.n else None, "limit": cfg.min_decline_overlap}
    if n < cfg.min_samples:
        return _too_few(cfg, levels, test, {"paired decisions": n}, **fields)
    judged = judge(cfg.min_decline_overlap - m.mean, m.variance_of_mean(), levels, (1 - cfg.min_decline_overlap) / 2,
                   m.n > 0)  # fmt: skip
    kappa = cohens_kappa(dec[:, 0], dec[:, 1])
    detail = (
        f"{int(both.sum())} declined by both of {int(either.sum())} declined by either over {n} pairs "
        f"(kappa {kappa:.3f}, raw agreement {float((dec[:, 0] == dec[:, 1]).mean()):.4f}); {_cs(judged)}"
    )
    return _result(cfg, levels, judged.code, judged, test, samples=n, detail=detail, **fields)


def cohens_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two binary decision vectors (agreement corrected for chance)."""
    if len(a) == 0:
        return math.nan
    p_o = float((a == b).mean())
    p_e = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return math.nan if p_e >= 1 else (p_o - p_e) / (1 - p_e)


def online_recall(cfg: OnlineRecallGuardrail, obs: Observations, levels: Levels) -> GuardrailResult:
    """Recall at the decision threshold among labelled frauds (min_samples counts labelled frauds). Relative:
    D = (1 - max_drop) recall_champion - recall_challenger; in shadow paired over frauds scored by both (only
    the discordant frauds move the estimate: McNemar-style), two arms clustered by account in a canary.
    Absolute: D = min_recall - recall. value/baseline: recalls; limit: max_drop (absolute: min_recall)."""
    cand, k = obs.candidate, 1 - cfg.max_drop
    if _absolute(cfg, obs, cfg.min_recall) and cfg.min_recall is not None:
        test = f"{cand.name} recall >= {cfg.min_recall:g}"
        score, label, acc = cand.labelled()
        caught = Moments.proportion((score[label == 1] >= obs.threshold).astype(float), acc[label == 1])
        fields = {"value": caught.mean if caught.n else None, "limit": cfg.min_recall}
        if caught.n < cfg.min_samples:
            return _too_few(cfg, levels, test, {f"{cand.name} labelled frauds": int(caught.n)}, **fields)
        judged = judge(cfg.min_recall - caught.mean, caught.variance_of_mean(), levels, 0.1)
        detail = f"{cand.name} recall {int(caught.s)}/{int(caught.n)} = {float(caught.mean):.4f}; {_cs(judged)}"
        return _result(cfg, levels, judged.code, judged, test, samples=int(caught.n), detail=detail, **fields)
    base = obs.baseline
    test = f"recall_{cand.name} >= {k:g} x recall_champion"
    if base is None:
        return _no_bound(cfg, levels, cfg.max_drop, test)
    scale, bad = recall_scales(cfg)
    if obs.pairs is not None:
        fraud = obs.pairs.label == 1
        hit = (obs.pairs.scores[fraud] >= obs.threshold).astype(float)
        n = int(fraud.sum())
        fields = {"value": hit[:, 1].mean() if n else None, "baseline": hit[:, 0].mean() if n else None}
        fields["limit"] = cfg.max_drop
        if n < cfg.min_samples:
            return _too_few(cfg, levels, test, {"labelled frauds scored by both": n}, **fields)
        judged = judge(
            *paired(Moments.of(k * hit[:, 0] - hit[:, 1], obs.pairs.account[fraud])), levels, scale, fail_scale=bad
        )
        only_b, only_c = int((hit[:, 0] > hit[:, 1]).sum()), int((hit[:, 1] > hit[:, 0]).sum())
        detail = (
            f"paired over {n} labelled frauds: recall {hit[:, 1].mean():.4f} vs champion {hit[:, 0].mean():.4f} "
            f"(discordant: {only_b} caught by the champion only, {only_c} by the challenger only); {_cs(judged)}"
        )
        return _result(cfg, levels, judged.code, judged, test, samples=n, detail=detail, **fields)
    mc, mb = _caught(cand, obs.threshold), _caught(base, obs.threshold)
    fields = {"value": mc.mean, "baseline": mb.mean, "limit": cfg.max_drop}
    counts = {f"{cand.name} labelled frauds": int(mc.n), "champion labelled frauds": int(mb.n)}
    if min(counts.values()) < cfg.min_samples:
        return _too_few(cfg, levels, test, counts, **fields)
    est, var = difference(mb, mc, 1.0 / k, 0.0)  # D / k = recall_b - recall_c / k: same sign
    judged = judge(k * est, k * k * var, levels, scale, fail_scale=bad)
    detail = (
        f"recall {cand.name} {int(mc.s)}/{int(mc.n)} = {float(mc.mean):.4f} vs champion {int(mb.s)}/{int(mb.n)} = "
        f"{float(mb.mean):.4f}; {_cs(judged)}"
    )
    return _result(cfg, levels, judged.code, judged, test, samples=min(counts.values()), detail=detail, **fields)


PLANNED_RECALL = 0.6  # the champion recall the boundaries are tuned for (a planning figure, not a guarantee)
PLANNED_RECALL_DROP = 0.2  # the bad challenger the recall guardrail is tuned to catch fastest: 20 % lower recall


def recall_scales(cfg: OnlineRecallGuardrail) -> tuple[float, float]:
    """(margin, planned bad effect) of the relative recall contrast in units of D, at PLANNED_RECALL: the pass
    side is tuned for half the margin, the fail side for a 20 % recall drop (or one margin beyond, if larger)."""
    margin = max(PLANNED_RECALL * cfg.max_drop, 0.005)
    return margin, max(PLANNED_RECALL * (PLANNED_RECALL_DROP - cfg.max_drop), margin)


def _caught(arm: Arm, threshold: float) -> Moments:
    score, label, acc = arm.labelled()
    return Moments.proportion((score[label == 1] >= threshold).astype(float), acc[label == 1])


def online_log_loss(cfg: OnlineLogLossGuardrail, obs: Observations, levels: Levels) -> GuardrailResult:
    """Mean log loss on labelled requests (min_samples counts labelled requests). Relative:
    D = mean_challenger - (1 + max_increase) mean_champion; paired per labelled request in shadow, two arms
    clustered by account in a canary. Absolute: D = mean - max_log_loss.
    value/baseline: mean log losses; limit: max_increase (absolute: max_log_loss)."""
    cand, factor = obs.candidate, 1 + cfg.max_increase
    if _absolute(cfg, obs, cfg.max_log_loss) and cfg.max_log_loss is not None:
        test = f"{cand.name} mean log loss <= {cfg.max_log_loss:g}"
        score, label, acc = cand.labelled()
        m = Moments.of(log_losses(score, label), acc)
        fields = {"value": m.mean if m.n else None, "limit": cfg.max_log_loss}
        if m.n < cfg.min_samples:
            return _too_few(cfg, levels, test, {f"{cand.name} labelled": int(m.n)}, **fields)
        judged = judge(*difference(m, None, 0, cfg.max_log_loss), levels, 0.05)
        detail = f"{cand.name} mean log loss {float(m.mean):.4f} over {int(m.n)} labelled; {_cs(judged)}"
        return _result(cfg, levels, judged.code, judged, test, samples=int(m.n), detail=detail, **fields)
    base = obs.baseline
    test = f"mean log loss {cand.name} <= {factor:g} x champion"
    if base is None:
        return _no_bound(cfg, levels, cfg.max_increase, test)
    scale = max(0.06 * cfg.max_increase, 1e-3)
    if obs.pairs is not None:
        labelled = np.isfinite(obs.pairs.label)
        y = obs.pairs.label[labelled]
        ll = np.column_stack([log_losses(obs.pairs.scores[labelled, j], y) for j in (0, 1)])
        n = len(y)
        fields = {"value": ll[:, 1].mean() if n else None, "baseline": ll[:, 0].mean() if n else None}
        fields["limit"] = cfg.max_increase
        if n < cfg.min_samples:
            return _too_few(cfg, levels, test, {"labelled pairs": n}, **fields)
        judged = judge(*paired(Moments.of(ll[:, 1] - factor * ll[:, 0], obs.pairs.account[labelled])), levels, scale)
        detail = f"paired over {n} labelled requests: {ll[:, 1].mean():.4f} vs champion {ll[:, 0].mean():.4f}"
        return _result(cfg, levels, judged.code, judged, test, samples=n, detail=f"{detail}; {_cs(judged)}", **fields)
    mc, mb = (Moments.of(log_losses(s, y), a) for s, y, a in (cand.labelled(), base.labelled()))
    fields = {"value": mc.mean, "baseline": mb.mean, "limit": cfg.max_increase}
    counts = {f"{cand.name} labelled": int(mc.n), "champion labelled": int(mb.n)}
    if min(counts.values()) < cfg.min_samples:
        return _too_few(cfg, levels, test, counts, **fields)
    judged = judge(*difference(mc, mb, factor, 0.0), levels, scale)
    detail = f"mean log loss {cand.name} {float(mc.mean):.4f} vs champion {float(mb.mean):.4f} x {factor:g}"
    return _result(cfg, levels, judged.code, judged, test, samples=min(counts.values()),
                   detail=f"{detail}; {_cs(judged)}", **fields)  # fmt: skip


# ---------------------------------------------------------------- helpers kept for reports and planning


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """One-sided exact (Clopper-Pearson) bounds: (lower, upper), each holding with probability `confidence`."""
    alpha = 1.0 - confidence
    lower = float(stats.beta.ppf(alpha, successes, trials - successes + 1)) if successes > 0 else 0.0
    upper = float(stats.beta.ppf(confidence, successes + 1, trials - successes)) if successes < trials else 1.0
    return lower, upper


def population_stability_index(
    expected: np.ndarray, actual: np.ndarray, bins: int = 10, floor: float = 1e-4, extra_edges: tuple[float, ...] = ()
) -> float:
    """PSI = sum over bins of (a - e) ln(a / e), bins at the quantiles of `expected` plus `extra_edges` (the
    decision region: without them every decline falls into the top decile); empty bins count as `floor`."""
    if len(expected) == 0 or len(actual) == 0:
        return math.nan
    edges = np.unique(np.concatenate([np.quantile(expected, np.linspace(0, 1, bins + 1))[1:-1], extra_edges]))
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
    """Labelled frauds per variant for a fixed-sample one-sided two-proportion (Wald) test to detect a recall
    drop, r2 = r1 (1 - relative_drop), against H0: r_c >= (1 - margin) r_b: n = (z_conf + z_power)^2 (r2 (1 - r2)
    + m^2 r1 (1 - r1)) / (m r1 - r2)^2, m = 1 - margin. The unpaired, fixed-sample reference; the guardrails
    themselves are sequential and paired in shadow (`benchmarks/guardrails.py` measures what they need)."""
    if not 0 < champion_recall < 1:
        raise ValueError(f"champion_recall must be in (0, 1), got {champion_recall}")
    if not margin < relative_drop < 1:
        raise ValueError(f"relative_drop must be in ({margin}, 1): a drop within the margin is not a failure")
    r1, r2, m = champion_recall, champion_recall * (1 - relative_drop), 1 - margin
    z = stats.norm.ppf(confidence) + stats.norm.ppf(power)
    return math.ceil(z**2 * (r2 * (1 - r2) + m**2 * r1 * (1 - r1)) / (m * r1 - r2) ** 2)


GUARDRAILS: dict[str, Callable[[Any, Observations, float], GuardrailResult]] = {
    "error_rate": error_rate,
    "latency_p99": latency_p99,
    "score_shift": score_shift,
    "shadow_agreement": shadow_agreement,
    "decline_rate": decline_rate,
    "online_recall": online_recall,
    "online_log_loss": online_log_loss,
}
# Kinds judged from another system's data by the caller (monitoring.rollout.analysis), not from the log here.
EXTERNAL_KINDS = ("prometheus",)


def evaluate_guardrails(
    spec: RolloutSpec,
    phase_kind: str,
    predictions: pd.DataFrame,
    feedback: pd.DataFrame | None,
    *,
    threshold: float,
    weight: float | None = None,
) -> list[GuardrailResult]:
    """Every guardrail of `spec` that applies to `phase_kind` ("shadow", "canary" or "watch"), in spec order,
    on the given window of the prediction log (the caller picks the window: the current phase's, so each CS
    starts with the phase) and the feedback received so far, each at its share of the error budget. `weight`: the
    canary phase's traffic weight (at 1.0, the 100 % step, bounds are absolute: see the module docstring)."""
    from monitoring.rollout.slice_guardrails import SLICE_GUARDRAILS  # built on this module, so imported late

    obs = observe(phase_kind, predictions, feedback, threshold=threshold, weight=weight)
    kinds = GUARDRAILS | SLICE_GUARDRAILS
    results = [
        kinds[cfg.kind](cfg, obs, levels_for(spec, cfg))
        for cfg in spec.guardrails
        if cfg.kind not in EXTERNAL_KINDS and applies(cfg, obs)
    ]
    ignored = ignored_labels(predictions, feedback)
    if not any(ignored.values()):
        return results
    note = ", ".join(f"{n} {why}" for why, n in ignored.items() if n)
    uses_labels = {cfg.name for cfg in spec.guardrails if type(cfg).USES_LABELS}
    return [replace(r, detail=f"{r.detail} (labels ignored: {note})") if r.name in uses_labels else r for r in results]


def ignored_labels(predictions: pd.DataFrame, feedback: pd.DataFrame | None) -> dict[str, int]:
    """Labels that are no evidence, counted so an analysis says why it saw fewer than it was sent: labels for
    request ids this window never served, and labels other than 0/1. They never count towards a pass."""
    if feedback is None or feedback.empty or REQUEST_ID not in feedback.columns:
        return {"for requests not in this window": 0, "not 0 or 1": 0}
    known = feedback[REQUEST_ID].isin(set(predictions[REQUEST_ID])) if REQUEST_ID in predictions else False
    label = pd.to_numeric(feedback[LABEL], errors="coerce") if LABEL in feedback.columns else pd.Series(np.nan)
    return {
        "for requests not in this window": int((~np.asarray(known, dtype=bool)).sum()),
        "not 0 or 1": int((np.asarray(known, dtype=bool) & ~label.isin([0, 1]).to_numpy()).sum()),
    }


def applies(cfg: GuardrailConfig, obs: Observations) -> bool:
    """A guardrail applies to the phase kinds it names, except that at the 100 % step (`Observations.full_step`:
    the champion gets no new traffic) a purely relative guardrail (no absolute bound) has nothing to compare
    with: it is left out, so it neither blocks the step forever as "inconclusive" nor passes without evidence."""
    if obs.phase_kind not in cfg.applies_to:
        return False
    if obs.full_step:
        bound_name = type(cfg).WATCH_LIMIT
        return bound_name is not None and getattr(cfg, bound_name) is not None
    return True


def overall_verdict(results: list[GuardrailResult]) -> Verdict:
    """fail if any guardrail failed, pass if all passed (and there is at least one), else inconclusive."""
    return combine_verdicts(result.verdict for result in results)
