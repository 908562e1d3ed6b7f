"""How many labelled frauds, and how much paired shadow time, a slice needs before `slice-recall` catches its recall
halved: the evidence behind the README's *Slices* figures.

Per merchant category and spec: the champion's recall r in the category comes from the benchmark's pool
(`benchmarks/guardrails.py`); the challenger catches each fraud the champion catches with probability 1/2 and
no other (recall r/2, `slice_recall_halved`, without the retrain's own discordance, which only adds variance:
the figures are lower bounds). Per labelled fraud of the slice, the paired difference D = (1 - max_drop)
caught_champion - caught_challenger is drawn i.i.d., and the real `judge` (the slice's Bonferroni share of the
spec's budget, the spec's `min_samples`) looks after every fraud. Reported: the median and 80th percentile of
the frauds at the first failing look over 1,000 walks, the seconds that takes at the spec's planned rate (labels
assumed at once: a lower bound), and the requests/s at which the 80th percentile fits in 1,800 s of shadow (the
default's shadow deadline).

    .venv/bin/python benchmarks/slice_power.py [--categories fuel,travel] [--walks 1000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.guardrails import THRESHOLD, _planning, build_pool  # noqa: E402
from monitoring.rollout.guardrails import FAIL, Moments, judge, levels_for, paired  # noqa: E402
from monitoring.rollout.slice_guardrails import slice_alpha  # noqa: E402
from monitoring.rollout.spec import spec_from_setting  # noqa: E402

MAX_FRAUDS = 6000  # walks that have not failed by then count as never


def frauds_to_fail(d: np.ndarray, spec_name: str, walks: int, rng: np.random.Generator) -> np.ndarray:
    """Per walk, the labelled frauds at the first failing look of the slice-recall guardrail (inf: none)."""
    spec = spec_from_setting(spec_name)
    cfg = next(c for c in spec.guardrails if c.kind == "slice_recall")
    alpha = slice_alpha(levels_for(spec, cfg), cfg.slices)
    x = rng.choice(d, size=(walks, MAX_FRAUDS))
    n = np.broadcast_to(np.arange(1, MAX_FRAUDS + 1, dtype=float), x.shape)
    s, ss = np.cumsum(x, axis=1), np.cumsum(x * x, axis=1)
    scale = max(0.6 * cfg.max_drop, 0.01)
    code = np.asarray(judge(*paired(Moments(n, s, ss, ss, s, n)), alpha, scale, n >= cfg.min_samples).code)
    failed = code == FAIL
    return np.where(failed.any(axis=1), failed.argmax(axis=1) + 1.0, np.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", default="fuel,travel,online_retail,electronics")
    parser.add_argument("--walks", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pool, rng = build_pool(), np.random.default_rng(args.seed)
    frauds = pool.label == 1
    for spec_name in ("default", "fast"):
        spec = spec_from_setting(spec_name)
        cfg = next(c for c in spec.guardrails if c.kind == "slice_recall")
        rps = _planning(spec).rps
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
                f"80 % within 1,800 s needs {rps * p80 / per_s / 1800:.0f} rps"
            )


if __name__ == "__main__":
    main()
