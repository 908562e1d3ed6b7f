"""Slice coverage: which slices a rollout's `slice_recall` guardrail actually protects at a given traffic rate.

A slice guardrail never holds a phase, it can only fail it (`monitoring.rollout.slice_guardrails`). So a
regression confined to one slice is caught only if that slice's confidence sequence clears the margin before
the shadow phase ends, and a healthy-on-average challenger ends the shadow phase when the whole-traffic
guardrails pass: at the planner's identical-challenger time (`PhasePlan.pass_s`), at the latest at the shadow
deadline. A slice is **covered** when its planned regression is failed with 80 % probability by then.

Construction, per `slice_recall` guardrail judged in shadow and per slice (column, category) of its columns:
the planner's Gaussian model of the paired contrast D = (1 - max_drop) hit_champion - hit_challenger per labelled
fraud of the slice (`planner._paired_recall_variance`: two healthy retrains disagree on `discordant_frauds` of
the frauds, half each way), with the challenger losing half its catches in the slice (`PLANNED_SLICE_DROP`: the
slice's recall halved), so D = (1 - max_drop - 1/2) x recall. The slice is failed once
D - b_fail(I) - z_0.8 / sqrt(I) > 0 with I = n / Var(d) after n labelled frauds of the slice (and n >= the
guardrail's `min_samples`): the one-sided anytime-valid boundary `guardrails.one_sided_boundary` at the slice's
Bonferroni level (`slice_alpha(levels_for(spec, cfg), cfg.slices)`) and the slice guardrail's own effect
(`slice_recall_scale`), which is what `judge` applies at every look. The slice's labelled frauds arrive at
rps x fraud_rate x (its share of the frauds) per second, `label_delay_s` late.

Assumptions (planning figures, not measurements): the slice's share of the frauds and of the payments come from a
reference dataset (the CLI's `--reference`, default the synthetic data family); the champion's recall in the
slice defaults to the planning recall (`Planning.champion_recall`); labels arrive `label_delay_s` late, all of
them; frauds are independent (account clustering widens real intervals, so real times are a little longer);
the halving is the benchmark's (`benchmarks/slice_power.py`, which walks the real `judge` through the same
model with `discordant_frauds` = 0).

Not planned: `slice_decline_rate` and `slice_agreement`. Both depend on the champion's decline rate in each
slice, which a reference dataset without scores does not carry (and a uniform decline rate would misstate the
high- and low-risk slices alike).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from monitoring.rollout.guardrails import levels_for, one_sided_boundary
from monitoring.rollout.planner import NEVER, POWER, _paired_recall_variance, phase_pass_s
from monitoring.rollout.slice_guardrails import slice_alpha, slice_keys, slice_recall_scale
from monitoring.rollout.spec import OnlineRecallGuardrail, Planning, RolloutSpec, SliceRecallGuardrail

PLANNED_SLICE_DROP = 0.5  # the slice regression planned for: the slice's recall halved
MAX_UNITS = 1e9  # beyond this many labelled frauds a slice counts as never failed
RPS_GRID = np.geomspace(0.1, 1e8, 181)  # rates searched for the rps a slice needs (20 per decade)
RPS_REFINE_STEPS = 12  # bisection steps between two grid rates (to 0.003 % of the rate)


@dataclass(frozen=True)
class SliceShare:
    """One slice in a reference dataset: its share of the payments and of the frauds, and optionally the
    champion's recall in it (None: the planning recall)."""

    payments: float
    frauds: float
    recall: float | None = None


@dataclass(frozen=True)
class SliceCoverage:
    """One slice of one `slice_recall` guardrail in shadow, at the planning rate.

    frauds_per_s: labelled frauds of the slice per second; frauds_needed: labelled frauds of the slice by which a
    halving of its recall is failed with 80 % probability (inf: never); seconds: when that many have arrived;
    budget_s: how long the shadow phase lasts for a healthy challenger (its median pass time, at most its
    deadline); rps_needed: the smallest rate at which the slice is covered (inf: none); whole_drop: the relative
    drop of the whole-traffic recall the slice's halving causes (its share of the caught frauds, halved): beyond
    `online_recall`'s `max_drop` in shadow, the whole-traffic guardrail fails or holds the shadow phase itself,
    so an uncovered slice is then still not promoted (`beyond_whole_margin`)."""

    guardrail: str
    slice: str  # "merchant_category=fuel"
    payments: float
    frauds: float
    recall: float
    frauds_per_s: float
    frauds_needed: float
    seconds: float
    budget_s: float
    covered: bool
    rps_needed: float
    whole_drop: float
    beyond_whole_margin: bool


def frauds_to_fail_halving(
    cfg: SliceRecallGuardrail,
    spec: RolloutSpec,
    recall: float,
    discordant: float,
    power: float = POWER,
    key: str | None = None,
    design_effect: float = 1.0,
) -> float:
    """Labelled frauds of one slice by which a halving of its recall (champion recall `recall`) is failed with
    probability `power` (Gaussian model, see the module docstring); inf when the halving lies within the margin
    (the slice `key`'s own margin when it has one). `design_effect`: account clustering (`Planning.design_effect`)
    widens the variance per fraud by that factor."""
    k = 1 - (cfg.max_drop if key is None else cfg.drop_for(key))
    bad = (k - 1 + PLANNED_SLICE_DROP) * recall
    if bad <= 0:
        return NEVER
    # two retrains cannot disagree on more frauds than one of them catches, or misses
    discordant = min(discordant, 2 * recall, 2 * (1 - recall))
    variance = _paired_recall_variance(recall, discordant, k, PLANNED_SLICE_DROP) * design_effect
    fail = slice_alpha(levels_for(spec, cfg), cfg.slices).fail
    effect, z = slice_recall_scale(cfg, key), float(stats.norm.ppf(power))

    def ok(n: np.ndarray) -> np.ndarray:
        information = n / variance
        return bad - one_sided_boundary(information, fail, effect) - z / np.sqrt(information) > 0

    grid = np.unique(np.ceil(np.geomspace(max(cfg.min_samples, 1), MAX_UNITS, 400)))
    hit = np.flatnonzero(ok(grid))
    if not len(hit):
        return NEVER
    if hit[0] == 0:
        return float(grid[0])
    low, high = int(grid[hit[0] - 1]), int(grid[hit[0]])  # ok(low) false, ok(high) true
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if ok(np.array([float(middle)]))[0] else (middle, high)
    return float(high)


def shares_from_frame(
    frame: pd.DataFrame, columns: list[str], label: str = "is_fraud"
) -> dict[tuple[str, str], SliceShare]:
    """Each (column, category) slice's share of the rows and of the rows labelled fraud in `frame` (a reference
    dataset with the schema's columns); categories outside the schema's are counted in no slice."""
    fraud = frame[label].to_numpy() == 1
    out: dict[tuple[str, str], SliceShare] = {}
    for column, category in slice_keys(columns):
        inside = frame[column].astype(str).to_numpy() == category
        frauds = float(inside[fraud].mean()) if fraud.any() else 0.0
        out[(column, category)] = SliceShare(float(inside.mean()) if len(inside) else 0.0, frauds)
    return out


def _seconds(frauds_needed: float, frauds_per_s: float, delay_s: float) -> float:
    if not math.isfinite(frauds_needed) or frauds_per_s <= 0:
        return NEVER
    return delay_s + frauds_needed / frauds_per_s


def _rps_needed(covered_at: Callable[[float], bool]) -> float:
    """The smallest rate on `RPS_GRID` at which `covered_at` holds, refined by bisection below it."""
    hits = [i for i, rate in enumerate(RPS_GRID) if covered_at(float(rate))]
    if not hits:
        return NEVER
    if hits[0] == 0:
        return float(RPS_GRID[0])
    low, high = float(RPS_GRID[hits[0] - 1]), float(RPS_GRID[hits[0]])
    for _ in range(RPS_REFINE_STEPS):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if covered_at(middle) else (middle, high)
    return high


def slice_coverage(
    spec: RolloutSpec, planning: Planning, shares: Mapping[tuple[str, str], SliceShare]
) -> list[SliceCoverage]:
    """Per `slice_recall` guardrail judged in shadow, per slice its columns can have (`slice_keys` order): whether
    a halving of the slice's recall is caught before a healthy challenger's shadow phase ends (see the module
    docstring). A slice absent from `shares` counts as carrying no traffic. Empty without a shadow phase."""
    shadow = next((phase for phase in spec.phases if phase.kind == "shadow"), None)
    if shadow is None:
        return []
    deadline = NEVER if shadow.max_duration_s is None else float(shadow.max_duration_s)
    passes: dict[float, float] = {}

    def budget_at(rps: float) -> float:
        if rps not in passes:
            passes[rps] = phase_pass_s(spec, shadow, planning.model_copy(update={"rps": rps}))
        return min(passes[rps], deadline)

    budget = budget_at(planning.rps)
    # the narrowest whole-traffic recall margin judged in shadow (None: no online_recall there)
    whole_margin = min((g.max_drop for g in spec.guardrails_for("shadow") if isinstance(g, OnlineRecallGuardrail)),
                       default=None)  # fmt: skip
    out: list[SliceCoverage] = []
    for cfg in spec.guardrails_for("shadow"):
        if not isinstance(cfg, SliceRecallGuardrail):
            continue
        for column, category in slice_keys(cfg.slices):
            share = shares.get((column, category), SliceShare(0.0, 0.0))
            recall = planning.champion_recall if share.recall is None else share.recall
            needed = frauds_to_fail_halving(cfg, spec, recall, planning.discordant_frauds, key=f"{column}={category}",
                                            design_effect=planning.design_effect)  # fmt: skip
            per_rps = planning.fraud_rate * share.frauds  # labelled frauds of the slice per second, per request/s

            def covered_at(rps: float, needed: float = needed, per_rps: float = per_rps) -> bool:
                return _seconds(needed, rps * per_rps, planning.label_delay_s) <= budget_at(rps)

            seconds = _seconds(needed, planning.rps * per_rps, planning.label_delay_s)
            whole_drop = PLANNED_SLICE_DROP * share.frauds * recall / planning.champion_recall
            out.append(
                SliceCoverage(
                    guardrail=cfg.name,
                    slice=f"{column}={category}",
                    payments=share.payments,
                    frauds=share.frauds,
                    recall=recall,
                    frauds_per_s=planning.rps * per_rps,
                    frauds_needed=needed,
                    seconds=seconds,
                    budget_s=budget,
                    covered=seconds <= budget,
                    rps_needed=_rps_needed(covered_at),
                    whole_drop=whole_drop,
                    beyond_whole_margin=whole_margin is not None and whole_drop > whole_margin,
                )
            )
    return out


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "never"
    if seconds < 600:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3 * 3600 else f"{seconds / 3600:.1f} h"


def coverage_summary(rows: list[SliceCoverage], rps: float) -> list[str]:
    """One line per guardrail: how many of its slices are covered at `rps`, and what each uncovered one needs
    (slowest first; "held by the whole-traffic recall" where the slice's halving also moves the whole-traffic
    recall beyond its margin)."""
    lines: list[str] = []
    for name in dict.fromkeys(row.guardrail for row in rows):
        mine = [row for row in rows if row.guardrail == name]
        covered = sum(row.covered for row in mine)
        line = f"{name} covers {covered} of {len(mine)} slices at {rps:g} rps"
        missing = sorted((row for row in mine if not row.covered), key=lambda row: -row.seconds)
        if missing:
            line += ": not covered: " + ", ".join(
                f"{row.slice.partition('=')[2]} ("
                + (f"needs {_duration(row.seconds)}" if math.isfinite(row.seconds) else "halving within margin")
                + ("; held by the whole-traffic recall)" if row.beyond_whole_margin else ")")
                for row in missing
            )
        lines.append(line)
    return lines
