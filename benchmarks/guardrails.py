"""Guardrails benchmark: how often whole simulated rollouts roll back an acceptable challenger, and how often
they catch a bad one, through the real state machine (`step`) and the real guardrail code.

What is simulated, per rollout (200 requests/s, 2 % fraud):

- Two models trained apart: logistic regressions fitted on two independent draws of `core.synthetic`
  (seeds 1 and 2), scoring a pool of 200,000 synthetic transactions (seed 3). The champion is the first, the
  `identical` challenger the second: a healthy retrain, with the score noise two trainings really have.
- Per second and per arm, the sufficient statistics the guardrails consume (`Moments`), drawn as Poisson
  counts of request types (the pool's cells of decisions, decision-region edges and labels); per-second
  log-loss sums add their within-cell noise. Each phase starts a fresh window, as the driver's does.
- Labels arrive late (`default`: 30 s, `fast`: 2 s); shadow errors come in failed batch calls of 64
  requests, and the error-rate variance is clustered by second, as the live guardrail's is.
- Canary arms are independent samples at the phase's weight; latency is log-normal (median 20 ms, sigma
  0.35); the p99 comparison uses a grid of thresholds around the champion's p99 (the champion's running p99 is
  the smallest grid threshold with at most 1 % of champion requests above it).
- Looks every 1, 5 or 60 s from the second second of each phase. Every analysis that is not inconclusive is
  fed to `step` in order, plus a `Tick` at the phase deadline and at the end of the post-promotion watch, so a
  rollout ends rolled back (in a phase or after promotion) or succeeded.

- Two slice cases side by side: `slice_recall_halved` halves recall in the category nearest 10 % of the
  payments (fuel: 10 % of payments, 1 % of frauds), `slice_recall_halved_frauds` in the category nearest 10 %
  of the frauds (travel: 5 % of payments, 17 % of frauds); `benchmarks/slice_power.py` sizes what each needs.
- Slice guardrails per merchant category (the category is part of the request type), each slice at its
  Bonferroni share over all 22 slices of its columns; the fraud amount caught from the pool's amounts (per-cell
  mean and within-cell variance, like log loss).

Not simulated (stated, not hidden): country slices (their budget share is still taken: each merchant slice is
judged at 1/22 of its guardrail's share; more judged slices could only add fails to `identical` and catches to
the slice cases), account-level clustering across seconds (requests are independent given the second; it is
simulated request by request in `benchmarks/guardrails_accounts.py`), and latency or quality cases at the margin
of every guardrail at once (`at_margin` and `inside_margin` put recall and errors at, or at half, their
tolerances).

    .venv/bin/python benchmarks/guardrails.py [--rollouts 1000] [--seed 0] [--cases a,b] [--pool-rows 200000]

The last stdout line is one JSON object (shape in the issue / README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.schema import CATEGORICAL_FEATURES, MERCHANT_CATEGORIES, NUMERIC_FEATURES  # noqa: E402
from core.settings import DEFAULT_DECISION_THRESHOLD  # noqa: E402
from core.synthetic import generate_transactions  # noqa: E402
from monitoring.rollout.driver import plan_for  # noqa: E402
from monitoring.rollout.guardrails import (  # noqa: E402
    FAIL,
    INCONCLUSIVE,
    PASS,
    Judgement,
    Levels,
    Moments,
    clopper_pearson,
    combine_codes,
    difference,
    judge,
    latency_tail_judgement,
    levels_for,
    log_losses,
    mass_change_judgement,
    paired,
    recall_scales,
    score_edges,
)
from monitoring.rollout.guardrails import PROPORTION_PSEUDO as PSEUDO  # noqa: E402
from monitoring.rollout.slice_guardrails import SLICE_GUARDRAILS, slice_alpha, slice_recall_scale  # noqa: E402
from monitoring.rollout.spec import Planning, RolloutSpec, default_spec, fast_spec  # noqa: E402
from monitoring.rollout.state_machine import Analysis, AnalysisResult, Start, Tick, initial_state, step  # noqa: E402

THRESHOLD = DEFAULT_DECISION_THRESHOLD
SHADOW_BATCH = 64
BASE_ERROR = 0.001
LATENCY_MEDIAN_MS, LATENCY_SIGMA = 20.0, 0.35
LATENCY_LEVELS = np.r_[np.linspace(0.97, 0.997, 10), 0.999]  # champion quantiles of the threshold grid
CASES = (
    "identical",
    "at_margin",
    "inside_margin",
    "recall_drop_20",
    "p99_x2",
    "errors_plus_2pt",
    "slice_recall_halved",
    "slice_recall_halved_frauds",
    "declines_halved",
    "random_decisions",
)
INTERVALS = (1, 5, 60)
CHUNK = 100  # rollouts simulated together
VERDICT = {FAIL: "fail", INCONCLUSIVE: "inconclusive", PASS: "pass"}


# ---------------------------------------------------------------- two models trained apart, one pool


def _planning(spec: RolloutSpec) -> Planning:
    """The traffic the spec is planned for (its `planning:`; the defaults where it has none)."""
    return spec.planning or Planning()


def _rps(spec: RolloutSpec) -> float:
    return _planning(spec).rps


def _design(frame: Any) -> np.ndarray:
    import pandas as pd

    numeric = frame[list(NUMERIC_FEATURES)].to_numpy(dtype=float)
    numeric = np.log1p(np.abs(numeric)) * np.sign(numeric)
    dummies = pd.get_dummies(frame[list(CATEGORICAL_FEATURES)].astype(str)).to_numpy(dtype=float)
    return np.column_stack([numeric, dummies])


@dataclass(frozen=True)
class Pool:
    champion: np.ndarray  # scores
    retrain: np.ndarray  # a healthy challenger's scores: the same recipe, trained on another draw
    label: np.ndarray
    category: np.ndarray
    amount: np.ndarray  # EUR, for the fraud amount caught


def build_pool(rows: int = 200_000) -> Pool:
    return pool_of(generate_transactions(rows, seed=3))


def pool_of(pool: Any) -> Pool:
    """Score the transactions `pool` with the two models trained apart (champion: seed 1, retrain: seed 2)."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    scores = []
    for seed in (1, 2):
        train = generate_transactions(60_000, seed=seed)
        both = pd.concat([train, pool], ignore_index=True)
        x = _design(both)
        model = LogisticRegression(C=1.0, max_iter=400).fit(x[: len(train)], train["is_fraud"].to_numpy())
        scores.append(model.predict_proba(x[len(train) :])[:, 1])
    return Pool(scores[0], scores[1], pool["is_fraud"].to_numpy(), pool["merchant_category"].astype(str).to_numpy(),
                pool["amount"].to_numpy(dtype=float))  # fmt: skip


# ---------------------------------------------------------------- cases: the challenger per spec


@dataclass(frozen=True)
class Case:
    challenger: np.ndarray  # scores on the pool
    error: float  # challenger error rate (shadow and canary)
    latency_factor: float


def _drop_caught(
    score: np.ndarray, label: np.ndarray, share: float, rng: np.random.Generator, where: Any = True
) -> np.ndarray:
    """The challenger misses `share` of the frauds it would catch (their scores fall just below the threshold)."""
    lose = (score >= THRESHOLD) & (label == 1) & where & (rng.random(len(score)) < share)
    return np.where(lose, 0.8 * THRESHOLD, score)


def _share_for(pool: Pool, drop: float) -> float:
    """The share of the retrain's caught frauds to lose for its recall to be (1 - drop) x the champion's."""
    recall_b = np.mean(pool.champion[pool.label == 1] >= THRESHOLD)
    recall_c = np.mean(pool.retrain[pool.label == 1] >= THRESHOLD)
    return float(np.clip(1 - (1 - drop) * recall_b / recall_c, 0.0, 1.0))


def make_case(name: str, spec: RolloutSpec, pool: Pool, rng: np.random.Generator) -> Case:
    recall = next(g for g in spec.guardrails if g.kind == "online_recall")
    errors = next(g for g in spec.guardrails if g.kind == "error_rate")
    c = pool.retrain
    if name in ("at_margin", "inside_margin"):
        part = 1.0 if name == "at_margin" else 0.5
        return Case(
            _drop_caught(c, pool.label, _share_for(pool, part * recall.max_drop), rng),
            BASE_ERROR + part * errors.max_increase,
            1.0,
        )  # type: ignore[union-attr]
    if name == "recall_drop_20":
        return Case(_drop_caught(c, pool.label, _share_for(pool, 0.2), rng), BASE_ERROR, 1.0)
    if name == "p99_x2":
        return Case(c, BASE_ERROR, 2.0)
    if name == "errors_plus_2pt":
        return Case(c, BASE_ERROR + 0.02, 1.0)
    if name == "slice_recall_halved":
        counts = {k: (pool.category == k).mean() for k in np.unique(pool.category)}
        category = min(counts, key=lambda k: abs(counts[k] - 0.10))
        return Case(_drop_caught(c, pool.label, 0.5, rng, pool.category == category), BASE_ERROR, 1.0)
    if name == "slice_recall_halved_frauds":
        # Side by side with the case above: the category carrying closest to 10 % of the frauds (travel in the
        # synthetic data: 5 % of payments, 17 % of frauds), so that the slice has evidence at the planned rate.
        frauds = pool.label == 1
        shares = {k: (pool.category[frauds] == k).mean() for k in np.unique(pool.category)}
        category = min(shares, key=lambda k: abs(shares[k] - 0.10))
        return Case(_drop_caught(c, pool.label, 0.5, rng, pool.category == category), BASE_ERROR, 1.0)
    if name == "declines_halved":
        halve = (c >= THRESHOLD) & (rng.random(len(c)) < 0.5)
        return Case(np.where(halve, 0.8 * THRESHOLD, c), BASE_ERROR, 1.0)
    if name == "random_decisions":
        return Case(rng.permutation(pool.champion), BASE_ERROR, 1.0)
    return Case(c, BASE_ERROR, 1.0)


# ---------------------------------------------------------------- request types and their statistics


@dataclass(frozen=True)
class Cells:
    """The pool collapsed into request types (cells): rate per second and per-cell values of each statistic."""

    rate: np.ndarray  # (K,) requests per second of each cell at full traffic
    values: dict[str, np.ndarray]  # statistic -> (K,) per-request value (mean within the cell)
    spread: dict[str, np.ndarray]  # statistic -> (K,) within-cell variance (log loss only)


def make_cells(spec: RolloutSpec, pool: Pool, case: Case) -> Cells:
    b, c, y = pool.champion, case.challenger, pool.label.astype(float)
    lo, hi = score_edges(THRESHOLD)
    bits = np.column_stack([b >= THRESHOLD, c >= THRESHOLD, b >= lo, c >= lo, b >= hi, c >= hi, y == 1]).astype(int)
    code = bits @ (1 << np.arange(bits.shape[1]))
    categories = list(MERCHANT_CATEGORIES)
    sliced = any(cfg.kind in SLICE_GUARDRAILS and cfg.kind != "fraud_amount_caught" for cfg in spec.guardrails)
    if sliced:
        # Slice guardrails: the merchant category is part of the request type (country slices: not simulated).
        code = code * len(categories) + np.searchsorted(categories, pool.category, sorter=np.argsort(categories))
    cells, index = np.unique(code, return_inverse=True)
    count = np.bincount(index).astype(float)
    mean = lambda v: np.bincount(index, weights=v) / count  # noqa: E731
    var = lambda v: np.maximum(mean(v * v) - mean(v) ** 2, 0.0)  # noqa: E731
    ll_b, ll_c = log_losses(b, y), log_losses(c, y)
    values: dict[str, np.ndarray] = {}
    spread: dict[str, np.ndarray] = {}
    bit = {name: (cells >> i) & 1 for i, name in enumerate(("dec_b", "dec_c", "lo_b", "lo_c", "hi_b", "hi_c", "y"))}
    values.update({k: v.astype(float) for k, v in bit.items()})
    if sliced:  # the category is coded in: decode it and the bits
        bit = {k: ((cells // len(categories)) >> i) & 1 for i, k in enumerate(bit)}
        values.update({k: v.astype(float) for k, v in bit.items()})
        order = np.argsort(categories)
        for position, name in enumerate(np.array(categories)[order]):
            values[f"cat={name}"] = (cells % len(categories) == position).astype(float)
    for cfg in spec.guardrails:
        if cfg.kind == "online_log_loss":
            d = ll_c - (1 + cfg.max_increase) * ll_b
            values["ll_d"], spread["ll_d"] = mean(d), var(d)
            values["ll_d2"] = mean(d * d)
            values["ll_c"], spread["ll_c"] = mean(ll_c), var(ll_c)
            values["ll_c2"] = mean(ll_c * ll_c)
        if cfg.kind == "fraud_amount_caught":  # per request (k A_b - A_c) / mean fraud amount, frauds only
            k = 1 - cfg.max_drop
            a = pool.amount * y / pool.amount[y == 1].mean()
            d = a * (k * (b >= THRESHOLD) - (c >= THRESHOLD))
            values["amt_d"], spread["amt_d"], values["amt_d2"] = mean(d), var(d), mean(d * d)
    return Cells(_rps(spec) * count / count.sum(), values, spread)


def _cum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x, axis=1)


def _moments_at(per_second: np.ndarray, squares: np.ndarray, looks: np.ndarray, count: np.ndarray) -> Moments:
    """Independent rows: cumulative n, s, ss at the look seconds (rows its own clusters)."""
    n = _cum(count)[:, looks]
    s = _cum(per_second)[:, looks]
    ss = _cum(squares)[:, looks]
    return Moments(n, s, ss, ss, s, n)


def _proportion_at(events: np.ndarray, count: np.ndarray, looks: np.ndarray, by_second: bool = False) -> Moments:
    n = _cum(count)[:, looks]
    s = _cum(events)[:, looks]
    if by_second:  # clustered by second: batch errors
        return Moments(n, s, s, _cum(events * events)[:, looks], _cum(events * count)[:, looks],
                       _cum(count * count)[:, looks], PSEUDO)  # fmt: skip
    return Moments(n, s, s, s, s, n, PSEUDO)


def _delayed(looks: np.ndarray, delay: float) -> np.ndarray:
    """Index of the last second whose labels have arrived at each look (-1: none)."""
    return np.floor(looks - delay).astype(int)


def _take(cumulative: np.ndarray, index: np.ndarray) -> np.ndarray:
    out = np.zeros((cumulative.shape[0], len(index)))
    ok = index >= 0
    out[:, ok] = cumulative[:, index[ok]]
    return out


# ---------------------------------------------------------------- one phase kind, simulated for a chunk


class Draws:
    """Per-second random draws of one phase for a set of rollouts, drawn on first use and cached, so a phase
    can be simulated block by block: `extend` keeps the rollouts still undecided and draws only their next
    seconds (every statistic is an independent Poisson count, or a standard normal, per second)."""

    def __init__(self, rng: np.random.Generator, rows: int, seconds: int) -> None:
        self.rng, self.rows, self.seconds = rng, rows, seconds
        self.arrays: dict[str, np.ndarray] = {}
        self.params: dict[str, tuple[str, Any]] = {}

    def _draw(self, kind: str, param: Any, rows: int, seconds: int) -> np.ndarray:
        if kind == "poisson":
            lam = np.asarray(param, dtype=float)
            return self.rng.poisson(lam, size=(rows, seconds, *lam.shape)).astype(float)
        return self.rng.standard_normal((rows, seconds))

    def poisson(self, name: str, lam: Any) -> np.ndarray:
        if name not in self.arrays:
            self.params[name] = ("poisson", lam)
            self.arrays[name] = self._draw("poisson", lam, self.rows, self.seconds)
        return self.arrays[name]

    def normal(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.params[name] = ("normal", None)
            self.arrays[name] = self._draw("normal", None, self.rows, self.seconds)
        return self.arrays[name]

    def extend(self, keep: list[int], seconds: int) -> Draws:
        more = Draws(self.rng, len(keep), seconds)
        for name, (kind, param) in self.params.items():
            fresh = self._draw(kind, param, len(keep), seconds - self.seconds)
            more.arrays[name] = np.concatenate([self.arrays[name][keep], fresh], axis=1)
            more.params[name] = (kind, param)
        return more


def shadow_codes(
    spec: RolloutSpec, cells: Cells, case: Case, draws: Draws, looks: np.ndarray, delay: float
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Verdict codes (rollouts, looks) per shadow guardrail, the phase's sample count and labelled frauds."""
    x = draws.poisson("cells", cells.rate)
    n_sec = x.sum(axis=2)
    v = cells.values
    at = looks.astype(int) - 1
    samples = _cum(n_sec)[:, at]
    labelled_at = _delayed(looks, delay) - 1
    codes: dict[str, np.ndarray] = {}
    frauds_sec = x @ v["y"]
    frauds = _take(_cum(frauds_sec), labelled_at)
    for cfg in spec.guardrails_for("shadow"):
        alpha = levels_for(spec, cfg)
        enough = samples >= cfg.min_samples
        if cfg.kind == "error_rate":
            batches = draws.poisson("failed_batches", _rps(spec) / SHADOW_BATCH * case.error)
            err = np.minimum(batches * SHADOW_BATCH, n_sec)
            d = _proportion_at(err, n_sec, at, by_second=True)
            j = judge(*paired(d, cfg.max_increase), alpha, max(cfg.max_increase, 1e-3), enough)
        elif cfg.kind in ("decline_rate", "score_shift"):
            m = cfg.max_change if cfg.kind == "decline_rate" else cfg.max_mass_change
            pairs = [("dec_b", "dec_c")] if cfg.kind == "decline_rate" else [("lo_b", "lo_c"), ("hi_b", "hi_c")]
            share = alpha if cfg.kind == "decline_rate" else alpha.split(2)
            js: list[Judgement] = []
            for kb, kc in pairs:
                up = v[kc] - (1 + m) * v[kb]
                down = (1 - m) * v[kb] - v[kc]
                hi = _moments_at(x @ up, x @ (up * up), at, n_sec)
                lo = _moments_at(x @ down, x @ (down * down), at, n_sec)
                js += mass_change_judgement(None, None, hi, lo, m, share, 0.02 * m, enough)
            codes[cfg.name] = combine_codes(*js)
            continue
        elif cfg.kind == "shadow_agreement":
            either = np.maximum(v["dec_b"], v["dec_c"])
            both = v["dec_b"] * v["dec_c"]
            m = _proportion_at(x @ both, x @ either, at)
            j = judge(cfg.min_decline_overlap - m.mean, m.variance_of_mean(), alpha,
                      (1 - cfg.min_decline_overlap) / 2, enough & (m.n > 0))  # fmt: skip
        elif cfg.kind == "online_recall":
            k = 1 - cfg.max_drop
            d = (k * v["dec_b"] - v["dec_c"]) * v["y"]
            s = _take(_cum(x @ d), labelled_at)
            ss = _take(_cum(x @ (d * d)), labelled_at)
            m = Moments(frauds, s, ss, ss, s, frauds)
            scale, bad = recall_scales(cfg)
            j = judge(*paired(m), alpha, scale, frauds >= cfg.min_samples, fail_scale=bad)
        elif cfg.kind == "online_log_loss":
            total = x @ v["ll_d"] + np.sqrt(x @ cells.spread["ll_d"]) * draws.normal("ll_noise")
            n = _take(_cum(n_sec), labelled_at)
            s = _take(_cum(total), labelled_at)
            ss = _take(_cum(x @ v["ll_d2"]), labelled_at)
            j = judge(*paired(Moments(n, s, ss, ss, s, n)), alpha, max(0.06 * cfg.max_increase, 1e-3),
                      n >= cfg.min_samples)  # fmt: skip
        elif cfg.kind == "fraud_amount_caught":
            total = x @ v["amt_d"] + np.sqrt(x @ cells.spread["amt_d"]) * draws.normal("amt_noise")
            s = _take(_cum(total), labelled_at)
            ss = _take(_cum(x @ v["amt_d2"]), labelled_at)
            j = judge(*paired(Moments(frauds, s, ss, ss, s, frauds)), alpha, max(0.6 * cfg.max_drop, 0.01),
                      frauds >= cfg.min_samples)  # fmt: skip
        elif cfg.kind in SLICE_GUARDRAILS:
            codes[cfg.name] = slice_codes(cfg, v, x, at, labelled_at, slice_alpha(alpha, cfg.slices))
            continue
        else:
            raise ValueError(f"benchmark does not simulate {cfg.kind} in shadow")
        codes[cfg.name] = np.asarray(j.code)
    return codes, samples, frauds


def _slice_columns(cfg: Any, v: dict[str, np.ndarray], key: str) -> list[np.ndarray]:
    """The per-cell values one slice of a slice guardrail sums per second (projected on the counts together)."""
    inside = v[key]
    if cfg.kind == "slice_recall":
        d = (1 - cfg.drop_for("merchant_category=" + key.removeprefix("cat="))) * v["dec_b"] - v["dec_c"]
        return [v["y"] * inside, d * v["y"] * inside, d * d * v["y"] * inside]
    if cfg.kind == "slice_decline_rate":
        m = cfg.max_change
        up, down = (v["dec_c"] - (1 + m) * v["dec_b"]) * inside, ((1 - m) * v["dec_b"] - v["dec_c"]) * inside
        return [inside, up, up * up, down, down * down]
    either = np.maximum(v["dec_b"], v["dec_c"]) * inside  # slice_agreement
    return [v["dec_b"] * v["dec_c"] * inside, either]


def slice_codes(
    cfg: Any, v: dict[str, np.ndarray], x: np.ndarray, at: np.ndarray, labelled_at: np.ndarray, alpha: Levels
) -> np.ndarray:
    """A slice guardrail in shadow, per merchant category (each at `alpha`, its Bonferroni share over all the
    slices of its columns): fail if any judged slice fails, pass once one is judged and none fails."""
    failed = judged = np.zeros((x.shape[0], len(at)), dtype=bool)
    keys = [k for k in v if k.startswith("cat=")]
    if not keys:
        return np.full((x.shape[0], len(at)), INCONCLUSIVE)
    columns = [_slice_columns(cfg, v, key) for key in keys]
    # One pass over the counts for every slice's sums (a matrix product), not one per sum: the counts are the
    # largest array of the benchmark, and reading them ~40 times per guardrail was most of its time.
    projected = x @ np.stack([c for per_key in columns for c in per_key], axis=1)
    offset = 0
    for key, per_key in zip(keys, columns, strict=True):
        sums = [projected[..., offset + i] for i in range(len(per_key))]
        offset += len(per_key)
        if cfg.kind == "slice_recall":
            n, s, ss = (_take(_cum(values), labelled_at) for values in sums)
            enough = n >= cfg.min_samples
            scale = slice_recall_scale(cfg, "merchant_category=" + key.removeprefix("cat="))
            code = judge(*paired(Moments(n, s, ss, ss, s, n)), alpha, scale, enough).code
        elif cfg.kind == "slice_decline_rate":
            m = cfg.max_change
            n_sec, up, up2, down, down2 = sums
            enough = _cum(n_sec)[:, at] >= cfg.min_samples
            hi = _moments_at(up, up2, at, n_sec)
            lo = _moments_at(down, down2, at, n_sec)
            code = combine_codes(*mass_change_judgement(None, None, hi, lo, m, alpha, 0.02 * m, enough))
        else:  # slice_agreement
            both, either = sums
            m_ = _proportion_at(both, either, at)
            enough = m_.n >= cfg.min_samples
            code = judge(cfg.min_decline_overlap - m_.mean, m_.variance_of_mean(), alpha,
                         (1 - cfg.min_decline_overlap) / 2, enough).code  # fmt: skip
        failed = failed | (np.asarray(code) == FAIL)
        judged = judged | np.asarray(enough)
    return np.where(failed, FAIL, np.where(judged, PASS, INCONCLUSIVE))


def _latency_counts(draws: Draws, name: str, lam: float, factor: float) -> np.ndarray:
    """Per second, requests above each grid threshold (grid at champion quantiles LATENCY_LEVELS)."""
    from scipy import stats

    z = stats.norm.ppf(LATENCY_LEVELS)
    above = stats.norm.sf(z - np.log(factor) / LATENCY_SIGMA)  # P(latency x factor > threshold)
    interval = -np.diff(np.r_[above, 0.0])  # mass between consecutive thresholds, the last open
    counts = draws.poisson(name, lam * interval)
    return np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]  # above threshold j


def canary_codes(
    spec: RolloutSpec, weight: float, case: Case, draws: Draws, looks: np.ndarray, watch: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Verdict codes per canary (or watch) guardrail. At weight 1 (and in the watch) the absolute bounds.
    Errors and successes are independent Poisson counts (a Poisson stream thinned by the error rate)."""
    at = looks.astype(int) - 1
    err_c = draws.poisson("err_c", _rps(spec) * weight * case.error)
    n_c = err_c + draws.poisson("ok_c", _rps(spec) * weight * (1 - case.error))
    samples = _cum(n_c)[:, at]
    absolute = watch or weight >= 1
    codes: dict[str, np.ndarray] = {}
    kind = "watch" if watch else "canary"
    if not absolute:
        err_b = draws.poisson("err_b", _rps(spec) * (1 - weight) * BASE_ERROR)
        n_b = err_b + draws.poisson("ok_b", _rps(spec) * (1 - weight) * (1 - BASE_ERROR))
    for cfg in spec.guardrails_for(kind):
        alpha = levels_for(spec, cfg)
        if cfg.kind == "error_rate":
            mc = _proportion_at(err_c, n_c, at)
            if absolute:
                assert cfg.max_rate is not None
                j = judge(*difference(mc, None, 0, cfg.max_rate), alpha, max(cfg.max_rate / 2, 1e-3),
                          samples >= cfg.min_samples)  # fmt: skip
            else:
                mb = _proportion_at(err_b, n_b, at)
                j = judge(*difference(mc, mb, 1.0, cfg.max_increase), alpha, max(cfg.max_increase, 1e-3),
                          np.minimum(samples, mb.n) >= cfg.min_samples)  # fmt: skip
        elif cfg.kind == "latency_p99":
            if absolute:
                assert cfg.max_p99_ms is not None
                from scipy import stats

                share = stats.norm.sf(
                    np.log(cfg.max_p99_ms / (LATENCY_MEDIAN_MS * case.latency_factor)) / LATENCY_SIGMA
                )
                above = draws.poisson("above_bound", _rps(spec) * weight * share)
                j = latency_tail_judgement(_proportion_at(above, n_c, at), None, 1.0, alpha,
                                           samples >= cfg.min_samples)  # fmt: skip
            else:
                up_c = _cum(_latency_counts(draws, "lat_c", _rps(spec) * weight, case.latency_factor))[:, at]
                up_b = _cum(_latency_counts(draws, "lat_b", _rps(spec) * (1 - weight), 1.0))[:, at]
                nb = _cum(n_b)[:, at]
                nc = samples
                # the champion's running p99: the first grid threshold with at most 1 % of its requests above
                ok = up_b <= 0.01 * nb[..., None]
                pick = np.where(ok.any(axis=-1), ok.argmax(axis=-1), len(LATENCY_LEVELS) - 1)
                a_c = np.take_along_axis(up_c, pick[..., None], axis=-1)[..., 0]
                a_b = np.take_along_axis(up_b, pick[..., None], axis=-1)[..., 0]
                cand = Moments(nc, a_c, a_c, a_c, a_c, nc, PSEUDO)
                base = Moments(nb, a_b, a_b, a_b, a_b, nb, PSEUDO)
                enough = np.minimum(nc, nb) >= cfg.min_samples
                j = latency_tail_judgement(cand, base, cfg.max_ratio_exceedance, alpha, enough)
        else:
            continue  # labelled guardrails in the watch: handled by watch_quality
        codes[cfg.name] = np.asarray(j.code)
    return codes, samples


def watch_quality(
    spec: RolloutSpec, cells: Cells, draws: Draws, looks: np.ndarray, delay: float
) -> dict[str, np.ndarray]:
    """The promoted model's recall and log loss against their absolute bounds, labels late."""
    x = draws.poisson("cells", cells.rate)
    n_sec = x.sum(axis=2)
    v = cells.values
    idx = _delayed(looks, delay) - 1
    codes: dict[str, np.ndarray] = {}
    for cfg in spec.guardrails_for("watch"):
        alpha = levels_for(spec, cfg)
        if cfg.kind == "online_recall" and cfg.min_recall is not None:
            n = _take(_cum(x @ v["y"]), idx)
            s = _take(_cum(x @ (v["y"] * v["dec_c"])), idx)
            m = Moments(n, s, s, s, s, n, PSEUDO)
            codes[cfg.name] = np.asarray(judge(cfg.min_recall - m.mean, m.variance_of_mean(), alpha, 0.1,
                                               n >= cfg.min_samples).code)  # fmt: skip
        elif cfg.kind == "online_log_loss" and cfg.max_log_loss is not None:
            n = _take(_cum(n_sec), idx)
            total = x @ v["ll_c"] + np.sqrt(x @ cells.spread["ll_c"]) * draws.normal("ll_noise")
            s = _take(_cum(total), idx)
            ss = _take(_cum(x @ v["ll_c2"]), idx)
            m = Moments(n, s, ss, ss, s, n)
            codes[cfg.name] = np.asarray(judge(*difference(m, None, 0, cfg.max_log_loss), alpha, 0.05,
                                               n >= cfg.min_samples).code)  # fmt: skip
    return codes


# ---------------------------------------------------------------- whole rollouts through step()


@dataclass
class Outcome:
    rolled_back: bool = False
    promoted: bool = False
    reached_full: bool = False
    decision_s: float = float("nan")
    labelled_frauds: float = 0.0
    phase: str = ""
    by_deadline: bool = False  # rolled back as undecided at a phase deadline, not by a failing guardrail


def _feed(plan: Any, state: Any, looks: np.ndarray, codes: dict[str, np.ndarray], row: int, samples: np.ndarray,
          start: float, end: float | None, min_duration: float) -> Any:  # fmt: skip
    """Feed one rollout's analyses of one phase to step(), in order, then the Tick at `end` (None: the block
    ends before the phase's deadline, no Tick). Left out, because step() ignores them: inconclusive analyses
    before the deadline, and all-pass ones before `min_duration` while no failure streak is open."""
    names = list(codes)
    if not names:
        return step(plan, state, Tick(at=start + end))[0] if end is not None else state
    stacked = np.stack([codes[n][row] for n in names])
    failed = (stacked == FAIL).any(axis=0)
    passed = (stacked == PASS).all(axis=0)
    index = state.phase_index
    for look in np.flatnonzero(failed | passed):
        if passed[look] and looks[look] < min_duration and state.consecutive_failures == 0:
            continue
        verdicts = {n: VERDICT[int(stacked[i, look])] for i, n in enumerate(names)}
        result = AnalysisResult(at=start + float(looks[look]), phase_index=index, samples=int(samples[row, look]),
                                verdicts=verdicts)  # fmt: skip
        state, _ = step(plan, state, Analysis(result))
        if state.terminal or state.phase_index != index:
            return state
    return step(plan, state, Tick(at=start + end))[0] if end is not None else state


BLOCK_S = 300  # a phase is simulated 300 s at a time, for the rollouts it has not decided yet


def _phase(
    spec: RolloutSpec, plan: Any, case: Case, cells: Cells, interval: int, rng: np.random.Generator, index: int,
    states: list[Any], alive: list[int], delay: float,
) -> np.ndarray:  # fmt: skip
    """Run phase `index` for the rollouts `alive` (updating `states`); the labelled frauds at each one's decision."""
    phase = spec.phases[index]
    deadline = float(phase.max_duration_s or 3600)
    horizon = int(deadline) + 1
    saved = {i: states[i] for i in alive}
    frauds_at = np.zeros(len(states))
    pending, draws, seconds = list(alive), None, 0
    previous: list[int] = []
    while pending:
        seconds = min(horizon, seconds + BLOCK_S)
        if draws is None:
            draws = Draws(rng, len(pending), seconds)
        else:
            draws = draws.extend([previous.index(i) for i in pending], seconds)
        previous = list(pending)
        looks = np.arange(1 + interval, seconds, interval, dtype=float)
        if phase.kind == "shadow":
            codes, samples, frauds = shadow_codes(spec, cells, case, draws, looks, delay)
        else:
            codes, samples = canary_codes(spec, float(phase.weight or 1.0), case, draws, looks)
            frauds = np.zeros_like(samples)
        final = seconds >= horizon
        still: list[int] = []
        for row, i in enumerate(pending):
            start = saved[i].phase_started_at
            end = deadline if final else None
            states[i] = _feed(plan, saved[i], looks, codes, row, samples, start, end, phase.min_duration_s)
            if not final and not states[i].terminal and states[i].phase_index == index:
                still.append(i)
                continue
            at = states[i].history[-1].at if states[i].history else start
            taken = np.searchsorted(looks, at - start, side="right") - 1
            frauds_at[i] = frauds[row, max(taken, 0)] if len(looks) else 0.0
        pending = still
    return frauds_at


def run_config(spec: RolloutSpec, case: Case, cells: Cells, interval: int, rollouts: int, seed: int) -> list[Outcome]:
    rng = np.random.default_rng(seed)
    plan = plan_for(spec, model_name="bench", challenger_version="2", champion_version="1", champion_slot="a",
                    previous_version=None, rollout_id="bench")  # fmt: skip
    delay = _planning(spec).label_delay_s
    outcomes: list[Outcome] = []
    for first in range(0, rollouts, CHUNK):
        size = min(CHUNK, rollouts - first)
        states = [step(plan, initial_state(plan, 0.0), Start(at=0.0))[0] for _ in range(size)]
        results = [Outcome() for _ in range(size)]
        frauds_total = np.zeros(size)
        for index, phase in enumerate(spec.phases):
            alive = [i for i, s in enumerate(states) if not s.terminal and s.phase_index == index]
            if not alive:
                break
            if phase.kind == "replay":
                # A replay judges logged history, which a simulated rollout has none of: its replay finds no
                # labelled request and goes on (on_inconclusive), as on a model's first rollout. The live phases
                # are what is measured; the replay still takes its share of the error budget.
                for i in alive:
                    empty = AnalysisResult(at=states[i].phase_started_at, phase_index=index, samples=0, verdicts={})
                    states[i] = step(plan, states[i], Analysis(empty))[0]
                continue
            if phase.kind == "canary" and (phase.weight or 0) >= 1:
                for i in alive:
                    results[i].reached_full = True
            frauds_total += _phase(spec, plan, case, cells, interval, rng, index, states, alive, delay)
        watching = [i for i, s in enumerate(states) if s.status == "promoted_watching"]
        if watching and spec.post_promotion_watch_s > 0:
            horizon = int(spec.post_promotion_watch_s) + 1
            looks = np.arange(1 + interval, horizon, interval, dtype=float)
            draws = Draws(rng, len(watching), horizon)
            codes, samples = canary_codes(spec, 1.0, case, draws, looks, watch=True)
            codes |= watch_quality(spec, cells, Draws(rng, len(watching), horizon), looks, delay)
            for row, i in enumerate(watching):
                results[i].reached_full = True
                states[i] = _feed(plan, states[i], looks, codes, row, samples, states[i].phase_started_at,
                                  float(spec.post_promotion_watch_s), float("inf"))  # fmt: skip
        for i, state in enumerate(states):
            out = results[i]
            out.rolled_back = state.status == "rolled_back"
            out.promoted = state.status == "succeeded"
            decision = next((d for d in reversed(state.history) if d.to_status in ("rolled_back", "promoted_watching")),
                            None)  # fmt: skip
            if out.rolled_back and decision is not None:
                out.decision_s = decision.at
                out.by_deadline = "undecided" in decision.reason
                out.phase = (
                    plan.phases[decision.phase_index].name if decision.phase_index < len(plan.phases) else "watch"
                )
            elif decision is not None:
                out.decision_s = decision.at
                out.phase = "promoted"
            out.labelled_frauds = float(frauds_total[i])
        outcomes += results
    return outcomes


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    k = sum(o.rolled_back for o in outcomes)
    lo, hi = clopper_pearson(k, n, 0.975)
    times = [o.decision_s for o in outcomes if np.isfinite(o.decision_s)]
    frauds = [o.labelled_frauds for o in outcomes]
    return {
        "rollouts": n,
        "rolled_back": k,
        "rate": round(k / n, 4) if n else None,
        "ci95": [round(lo, 4), round(hi, 4)],
        "median_labelled_frauds": float(np.median(frauds)) if frauds else None,
        "median_decision_s": float(np.median(times)) if times else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    parser.add_argument("--pool-rows", type=int, default=200_000, help="synthetic transactions scored by both models")
    args = parser.parse_args()
    started = time.time()
    pool = build_pool(args.pool_rows)
    recall = {k: np.mean(v[pool.label == 1] >= THRESHOLD) for k, v in (("b", pool.champion), ("c", pool.retrain))}
    print(f"pool: champion recall {recall['b']:.3f}, declines "
          f"{np.mean(pool.champion >= THRESHOLD):.4f}; retrain recall {recall['c']:.3f}, "
          f"declines {np.mean(pool.retrain >= THRESHOLD):.4f}", flush=True)  # fmt: skip
    report: dict[str, Any] = {}
    for c_index, name in enumerate(args.cases.split(",")):
        report[name] = {}
        for spec in (default_spec(), fast_spec()):
            case = make_case(name, spec, pool, np.random.default_rng(args.seed + 17 * c_index))
            cells = make_cells(spec, pool, case)
            report[name][spec.name] = {}
            for interval in INTERVALS:
                seed = args.seed + 1000 * c_index + 10 * interval + (spec.name == "fast")
                outcomes = run_config(spec, case, cells, interval, args.rollouts, seed)
                summary = summarise(outcomes)
                report[name][spec.name][str(interval)] = summary
                phases: dict[str, int] = {}
                for o in outcomes:
                    phases[o.phase or "undecided"] = phases.get(o.phase or "undecided", 0) + 1
                back = f"{summary['rolled_back']}/{summary['rollouts']}"
                print(f"{name:20s} {spec.name:8s} {interval:3d}s rolled back {back}"
                      f" ({sum(o.by_deadline for o in outcomes)} by a deadline) ci95 {summary['ci95']} promoted "
                    f"{sum(o.promoted for o in outcomes)} reached 100 % "
                      f"{sum(o.reached_full for o in outcomes)} median frauds {summary['median_labelled_frauds']} "
                      f"median decision {summary['median_decision_s']} s; decided in {phases} "
                      f"({time.time() - started:.0f} s)", flush=True)  # fmt: skip
    print(json.dumps({"benchmark": "guardrails", "rollouts": args.rollouts, "cases": report}))


if __name__ == "__main__":
    main()
