"""What it takes to catch a slice's recall halved, and why `slice_recall_halved` (fuel) cannot be caught at the
planned traffic: the evidence behind the README's *Slices* figures. Three parts, printed side by side per
merchant category, and one JSON line at the end.

1. **Walks through the real `judge`.** Per category and spec: the champion's recall r in the category comes from
   the benchmark's pool (`benchmarks/guardrails.py`); the challenger catches each fraud the champion catches with
   probability 1/2 and no other (recall r/2, `slice_recall_halved`, without the retrain's own discordance, which
   only adds variance). Per labelled fraud of the slice, the paired difference D = (1 - max_drop) caught_champion -
   caught_challenger is drawn i.i.d., and the real `judge` (the slice's Bonferroni share of the spec's budget, the
   spec's `min_samples`) looks after every fraud. Reported: the median and 80th percentile of the frauds at the
   first failing look over the walks, the seconds that takes at the spec's planned rate (labels at once: a lower
   bound), and the requests/s at which the 80th percentile fits the spec's shadow deadline (`default` 3,600 s,
   `fast` 200 s).

2. **The oracle bound: no valid test can do better.** Null P0 (on the boundary of the guardrail's margin m): the
   challenger catches each fraud the champion catches with probability 1 - m and no other; alternative P1 (the
   case): with probability 1/2. Both are fully specified, so by the Neyman-Pearson lemma the likelihood-ratio
   test (randomised at its boundary) is the most powerful level-alpha test of P0 against P1; P0 lies in the
   guardrail's null (recall_challenger >= (1 - m) recall_champion), so every test valid for that null, sequential
   or not, has at most this power against P1. The frauds the champion misses are distributed alike under both (the
   challenger catches none), so only C, the champion's catches (Poisson, mean rate x seconds x the slice's share of
   frauds x r), and X, the challenger's catches among them (binomial), matter; the power is summed exactly over
   (C, X). It is computed with every favour given: alpha = the whole rollout's `false_rollback_rate` (no split over
   guardrails, phases or slices), one look at the end, labels at once, no retrain noise, the alternative known.
   Reported: that power within the spec's shadow deadline and the seconds this oracle needs for 80 %.

3. **Healthy retrains differ in small slices.** `--retrains` logistic models trained like the benchmark's (seeds
   1..R, 60,000 rows each) score one large pool (`--spread-rows`, seed 3, enough frauds per category for the
   paired comparison to be precise). Per category and per ordered pair of seeds: the ratio of their recalls, and
   its z (net frauds caught by one and not the other over the square root of the discordant frauds). Reported: the
   smallest ratio, the share of pairs below the spec's 1 - max_drop and at or below 1/2 (as bad as the halving).
   A retrain is the normal case and must be promoted, so a slice where healthy retrains differ by as much as a
   halving cannot have a guardrail that fails a halving and passes retrains. Per slice it suggests a
   `max_drop_by_slice`: the largest drop seen plus 0.1, rounded up to 0.05, where that exceeds the default margin
   (the bundled specs carry these).

    .venv/bin/python benchmarks/slice_power.py [--categories fuel,travel] [--walks 1000] [--retrains 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.guardrails import THRESHOLD, _design, _planning, build_pool  # noqa: E402
from monitoring.rollout.guardrails import FAIL, Moments, judge, levels_for, paired  # noqa: E402
from monitoring.rollout.slice_guardrails import slice_alpha, slice_recall_scale  # noqa: E402
from monitoring.rollout.spec import spec_from_setting  # noqa: E402

MAX_FRAUDS = 6000  # walks that have not failed by then count as never
POWER = 0.8


# ---------------------------------------------------------------- 1. walks through the real judge


def frauds_to_fail(d: np.ndarray, spec_name: str, walks: int, rng: np.random.Generator) -> np.ndarray:
    """Per walk, the labelled frauds at the first failing look of the slice-recall guardrail (inf: none)."""
    spec = spec_from_setting(spec_name)
    cfg = next(c for c in spec.guardrails if c.kind == "slice_recall")
    alpha = slice_alpha(levels_for(spec, cfg), cfg.slices)
    x = rng.choice(d, size=(walks, MAX_FRAUDS))
    n = np.broadcast_to(np.arange(1, MAX_FRAUDS + 1, dtype=float), x.shape)
    s, ss = np.cumsum(x, axis=1), np.cumsum(x * x, axis=1)
    scale = slice_recall_scale(cfg)  # the guardrail's own tuning, at its default margin
    code = np.asarray(judge(*paired(Moments(n, s, ss, ss, s, n)), alpha, scale, n >= cfg.min_samples).code)
    failed = code == FAIL
    return np.where(failed.any(axis=1), failed.argmax(axis=1) + 1.0, np.inf)


# ---------------------------------------------------------------- 2. the oracle bound (Neyman-Pearson)


def oracle_power(caught: np.ndarray, margin: float, alpha: float, halved: float = 0.5) -> float:
    """The power against P1 of the most powerful level-`alpha` test of P0, where `caught[c]` is the probability
    that the champion catches c of the slice's frauds, and given c the challenger catches Binomial(c, 1 - margin)
    of them under P0, Binomial(c, halved) under P1 (and no other fraud under either). Neyman-Pearson: reject in
    order of the likelihood ratio P1/P0, randomising within the boundary's ratio so that the size is `alpha`."""
    if not 0.0 < margin < 1.0 - halved:
        raise ValueError(f"margin must lie in (0, {1.0 - halved:g}) for the halving to lie beyond it, got {margin}")
    cells_p0: list[np.ndarray] = []
    cells_p1: list[np.ndarray] = []
    cells_log_ratio: list[np.ndarray] = []
    for c, weight in enumerate(caught):
        if weight <= 0.0:
            continue
        x = np.arange(c + 1)
        cells_p0.append(weight * stats.binom.pmf(x, c, 1.0 - margin))
        cells_p1.append(weight * stats.binom.pmf(x, c, halved))
        # log P1/P0 per cell, exact (no division by tiny probabilities)
        cells_log_ratio.append(x * np.log(halved / (1.0 - margin)) + (c - x) * np.log((1.0 - halved) / margin))
    p0, p1, log_ratio = (np.concatenate(a) for a in (cells_p0, cells_p1, cells_log_ratio))
    # Cells with the same ratio form one group: the test randomises over a group as a whole.
    keys, group = np.unique(np.round(-log_ratio, 9), return_inverse=True)
    p0_group = np.bincount(group, weights=p0, minlength=len(keys))
    p1_group = np.bincount(group, weights=p1, minlength=len(keys))
    size = np.cumsum(p0_group)  # groups in order of decreasing ratio
    full = int(np.searchsorted(size, alpha, side="right"))  # groups rejected outright
    power = float(p1_group[:full].sum())
    if full < len(keys):
        spent = float(size[full - 1]) if full else 0.0
        power += float(p1_group[full]) * (alpha - spent) / float(p0_group[full])
    return min(power, 1.0)


def poisson_counts(mean: float) -> np.ndarray:
    """P(C = c) for c = 0.. until the tail is below 1e-12."""
    top = int(stats.poisson.ppf(1.0 - 1e-12, mean)) + 1 if mean > 0 else 0
    return stats.poisson.pmf(np.arange(top + 1), mean)


def oracle_seconds_for(power: float, caught_per_s: float, margin: float, alpha: float) -> float:
    """Seconds of labelled traffic the oracle test needs for `power` (bisection; the power grows with the time)."""
    low, high = 0.0, 1.0
    while oracle_power(poisson_counts(caught_per_s * high), margin, alpha) < power:
        low, high = high, 2.0 * high
        if high > 1e8:
            return float("inf")
    for _ in range(40):
        mid = (low + high) / 2
        if oracle_power(poisson_counts(caught_per_s * mid), margin, alpha) >= power:
            high = mid
        else:
            low = mid
    return high


# ---------------------------------------------------------------- 3. how much healthy retrains differ per slice


SPREAD_COLUMNS = ("merchant_category", "country")
SPREAD_SLACK = 0.1  # added to the largest drop seen between healthy retrains: 8 retrains do not show the whole tail


def suggested_margin(ratio_min: float, default: float) -> float:
    """A slice's `max_drop_by_slice` from the retrains' smallest recall ratio: the largest drop seen plus
    `SPREAD_SLACK`, rounded up to 0.05; None-like (the default) when that is not above the guardrail's default."""
    margin = float(np.ceil((1.0 - ratio_min + SPREAD_SLACK) * 20.0 - 1e-9) / 20.0)
    return min(margin, 0.95) if margin > default else default


def retrain_spread(retrains: int, rows: int) -> dict[str, dict[str, Any]]:
    """Per slice ("column=category"): the recall of each healthy retrain (seeds 1..retrains) on one pool, and
    the pairwise ratios."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from core.synthetic import generate_transactions

    pool = generate_transactions(rows, seed=3)
    label = pool["is_fraud"].to_numpy() == 1
    caught: list[np.ndarray] = []
    for seed in range(1, retrains + 1):
        train = generate_transactions(60_000, seed=seed)
        x = _design(pd.concat([train, pool], ignore_index=True))
        model = LogisticRegression(C=1.0, max_iter=400).fit(x[: len(train)], train["is_fraud"].to_numpy())
        caught.append(model.predict_proba(x[len(train) :])[:, 1] >= THRESHOLD)
    out: dict[str, dict[str, Any]] = {}
    keyed = [(f"{c}={v}", pool[c].astype(str).to_numpy() == v) for c in SPREAD_COLUMNS for v in sorted(set(pool[c]))]
    for name, inside in keyed:
        frauds = label & inside
        recalls = [float(c[frauds].mean()) for c in caught]
        pairs = []
        for i, j in itertools.permutations(range(retrains), 2):
            only_i = int((caught[i] & ~caught[j] & frauds).sum())
            only_j = int((caught[j] & ~caught[i] & frauds).sum())
            ratio = recalls[j] / recalls[i] if recalls[i] > 0 else float("nan")
            z = (only_i - only_j) / np.sqrt(only_i + only_j) if only_i + only_j else 0.0
            pairs.append((ratio, z, i + 1, j + 1))
        out[name] = {"frauds": int(frauds.sum()), "recalls": recalls, "pairs": pairs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", default="fuel,travel,online_retail,electronics")
    parser.add_argument("--walks", type=int, default=1000)
    parser.add_argument("--retrains", type=int, default=8, help="healthy retrains compared pairwise (0: skip)")
    parser.add_argument("--spread-rows", type=int, default=3_000_000, help="pool rows for the retrain comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pool, rng = build_pool(), np.random.default_rng(args.seed)
    frauds = pool.label == 1
    result: dict[str, Any] = {"benchmark": "slice_power", "walks": {}, "oracle": {}, "retrain_spread": {}}
    for spec_name in ("default", "fast"):
        spec = spec_from_setting(spec_name)
        cfg = next(c for c in spec.guardrails if c.kind == "slice_recall")
        rps = _planning(spec).rps
        budget = spec.false_rollback_rate
        deadline = next(p.max_duration_s for p in spec.phases if p.kind == "shadow")
        for category in args.categories.split(","):
            inside = pool.category == category
            recall = float(np.mean(pool.champion[frauds & inside] >= THRESHOLD))
            k = 1 - cfg.max_drop  # D per fraud: both catch it k - 1, the champion only k, neither 0
            d = rng.choice([k - 1, k, 0.0], size=100_000, p=[recall / 2, recall / 2, 1 - recall])
            first = frauds_to_fail(d, spec_name, args.walks, rng)
            median, p80 = np.percentile(first, [50, 80])
            per_s = rps * inside.mean() * pool.label[inside].mean()
            print(
                f"{spec_name:8s} {category:14s} {inside.mean():5.1%} of payments, {np.mean(inside[frauds]):5.1%} of "
                f"frauds, recall {recall:.2f} -> {recall / 2:.2f}: {per_s:.3f} labelled frauds/s at {rps:g} rps; "
                f"frauds to fail median {median:.0f}, 80 % {p80:.0f} = {p80 / per_s:.0f} s; "
                f"80 % within {deadline:,.0f} s needs {rps * p80 / per_s / deadline:.0f} rps"
            )
            oracle = oracle_power(poisson_counts(per_s * recall * deadline), cfg.max_drop, budget)
            oracle_s = oracle_seconds_for(POWER, per_s * recall, cfg.max_drop, budget)
            print(
                f"{'':8s} {'':14s} oracle (most powerful test at alpha {budget:g}, one look, margin {cfg.max_drop:g}): "
                f"power {oracle:.1%} within the {deadline:,.0f} s shadow deadline; 80 % needs {oracle_s:.0f} s"
            )
            result["walks"].setdefault(spec_name, {})[category] = {
                "payments_share": round(float(inside.mean()), 4),
                "frauds_share": round(float(np.mean(inside[frauds])), 4),
                "champion_recall": round(recall, 3),
                "labelled_frauds_per_s": round(per_s, 4),
                "frauds_to_fail_median": float(median),
                "frauds_to_fail_p80": float(p80),
                "seconds_p80": round(float(p80 / per_s), 1),
            }
            result["oracle"].setdefault(spec_name, {})[category] = {
                "alpha": budget,
                "margin": cfg.max_drop,
                "shadow_deadline_s": deadline,
                "power_within_shadow_deadline": round(oracle, 4),
                "seconds_for_80_percent": round(oracle_s, 1),
            }
    if args.retrains >= 2:
        margin = next(c for c in spec_from_setting("default").guardrails if c.kind == "slice_recall").max_drop
        for name, row in retrain_spread(args.retrains, args.spread_rows).items():
            ratios = np.array([p[0] for p in row["pairs"]])
            worst = min(row["pairs"], key=lambda p: p[0])
            summary = {
                "frauds": row["frauds"],
                "recall_min": round(min(row["recalls"]), 3),
                "recall_max": round(max(row["recalls"]), 3),
                "ratio_min": round(float(np.nanmin(ratios)), 3),
                "share_below_margin": round(float(np.mean(ratios < 1 - margin)), 3),
                "share_at_or_below_half": round(float(np.mean(ratios <= 0.5)), 3),
                "worst_pair": {"champion_seed": worst[2], "challenger_seed": worst[3], "z": round(worst[1], 1)},
                "suggested_max_drop": suggested_margin(float(np.nanmin(ratios)), margin),
            }
            result["retrain_spread"][name] = summary
            print(
                f"retrains {name:32s} {row['frauds']:5d} frauds: recall {summary['recall_min']:.3f}-"
                f"{summary['recall_max']:.3f}; smallest ratio {summary['ratio_min']:.2f} (seed {worst[3]} vs "
                f"{worst[2]}, z {worst[1]:.1f}); pairs below 1 - {margin:g}: {summary['share_below_margin']:.0%}, "
                f"at or below 1/2: {summary['share_at_or_below_half']:.0%}; margin {summary['suggested_max_drop']:g}"
            )
        spread = result["retrain_spread"].items()
        own = {k: v["suggested_max_drop"] for k, v in spread if v["suggested_max_drop"] > margin}
        print(f"suggested max_drop_by_slice (largest retrain drop + {SPREAD_SLACK:g}, rounded up to 0.05): {own}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
