"""The power planner: how long each phase of a spec needs to decide, at a given traffic rate.

For every phase and every guardrail judged in it, a Gaussian model of the guardrail's contrast D (the same
contrast and the same one-sided anytime-valid bounds as `monitoring.rollout.guardrails`) gives:

- the time at which an **identical challenger** (a healthy retrain) passes: its D is one margin inside, and the
  guardrail passes once D + b_pass(I) + z / sqrt(I) <= 0, where I = 1 / Var(estimate) grows with the samples;
- the time at which a challenger with **20 % lower recall** is failed, where recall is judged:
  D - b_fail(I) - z / sqrt(I) > 0.

z = 0 gives the median time (the "expected time to a decision" that `mlops rollout plan` prints); z > 0 the time
by which the decision has come with the stated probability. The phase decides when every guardrail has passed,
so a phase's time is the largest of its guardrails' (plus the phase's own `min_duration_s` and `min_samples`).

The planning figures are the spec's `planning:` block (rps, fraud rate, label delay, the champion's recall,
decline and error rates) and the constants below (how much two healthy retrains disagree). They are planning
assumptions, not measurements: `benchmarks/guardrails.py` measures whole rollouts against them. Account
clustering enters as `planning.design_effect` (every contrast's variance is multiplied by it: the guardrails'
variances are cluster-robust by account, so a clustered request carries 1 / design_effect of an independent one's
information); measure it on your own log with `mlops rollout design-effect`. Not modelled: the one-look delay of
`failure_limit`.

A replay phase is judged once, on requests already logged: it is not planned (`live_phases`).

`plan_problems(spec)` turns the plan into spec-validation problems, each naming the field and a value that
would work: a deadline a good challenger cannot meet with probability 1 - false_rollback_rate / (2 x phases),
a guardrail minimum that cannot be collected before the deadline, a recall margin that tolerates a 20 % drop,
and a phase without 80 % power to stop a 20 % drop. Stopping counts both ways a phase stops it: a failing
guardrail, or a pass side that holds it until the deadline rolls it back. The pass side lets a challenger
beyond the margin through with probability at most `false_promotion_rate` (anytime-valid), so a phase whose
fail side cannot reach 80 % power before its deadline is refused only when false_promotion_rate > 20 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats

from monitoring.rollout.guardrails import (
    MASS_SLACK,
    PASS_TUNING,
    PLANNED_RECALL_DROP,
    Levels,
    levels_for,
    one_sided_boundary,
    recall_scales,
)
from monitoring.rollout.spec import GuardrailConfig, Phase, Planning, RolloutSpec

# How much two healthy retrains of the same recipe disagree (measured on the benchmark's two models, 2026-12-04:
# 12 % of declines made by only one, per-request log losses correlated at 0.995; the share of frauds caught by
# exactly one is the spec's `planning.discordant_frauds`).
DISCORDANT_DECLINES = 0.12
LOG_LOSS_MEAN, LOG_LOSS_SD, LOG_LOSS_CORRELATION = 0.07, 0.3, 0.995
LATENCY_SHARE_ABOVE_BOUND = 0.001  # a healthy model's share of requests above the watch's p99 bound
POWER = 0.8
HALF_MARGIN_PASS = 0.9  # see PhasePlan.half_margin_pass_s
HORIZON_S = 24 * 3600.0  # no phase is planned beyond a day
NEVER = math.inf


@dataclass(frozen=True)
class Contrast:
    """One guardrail in one phase, as the planner models it: D (acceptable when <= 0) and the estimate's variance
    as a function of time. `units_per_s`: samples per second after `delay_s` (labels); `variance_unit`: the
    per-sample variance (two arms: already weighted by the arms' shares, so Var = variance_unit / n)."""

    name: str
    good: float  # D of an identical challenger
    bad: float | None  # D of a 20 % recall drop (None: this guardrail does not see it; it behaves as good)
    variance_good: float
    variance_bad: float
    units_per_s: float
    delay_s: float
    unit: str
    min_samples: int
    levels: Levels
    scale: float
    fail_scale: float

    def samples(self, t: float) -> float:
        return self.units_per_s * max(t - self.delay_s, 0.0)

    def _time(self, ok: Callable[[np.ndarray], np.ndarray], start: float) -> float:
        """The first second >= start (on a 1 s grid, then doubling) at which ok(n) holds."""
        t = max(start, 1.0)
        grid = np.unique(np.concatenate([np.arange(t, t + 3600.0), np.geomspace(t + 3600.0, HORIZON_S, 400)]))
        n = self.units_per_s * np.maximum(grid - self.delay_s, 0.0)
        hit = np.flatnonzero(ok(n) & (n >= self.min_samples))
        return float(grid[hit[0]]) if len(hit) else NEVER

    def time_to_pass(self, z: float = 0.0, start: float = 0.0) -> float:
        def ok(n: np.ndarray) -> np.ndarray:
            information = np.maximum(n, 1e-9) / self.variance_good
            bound = one_sided_boundary(information, self.levels.pass_, PASS_TUNING * self.scale)
            return self.good + bound + z / np.sqrt(information) <= 0

        return self._time(ok, start)

    def time_to_fail(self, z: float = 0.0, start: float = 0.0) -> float:
        if self.bad is None:
            return NEVER
        bad = self.bad

        def ok(n: np.ndarray) -> np.ndarray:
            information = np.maximum(n, 1e-9) / self.variance_bad
            bound = one_sided_boundary(information, self.levels.fail, self.fail_scale)
            return bad - bound - z / np.sqrt(information) > 0

        return self._time(ok, start)


def _two_arms(per_challenger: float, per_champion: float, weight: float) -> float:
    """Per-request variance of a difference of two arm means, in units of the challenger's requests."""
    return per_challenger + per_champion * weight / max(1 - weight, 1e-9)


def contrasts(spec: RolloutSpec, phase: Phase | None, planning: Planning) -> list[Contrast]:
    """The planner's model of every guardrail judged in `phase` (None: the post-promotion watch)."""
    kind = "watch" if phase is None else phase.kind
    weight = 1.0 if phase is None else float(phase.weight or 1.0)
    shadow = kind == "shadow"
    absolute = kind == "watch" or (kind == "canary" and weight >= 1)
    rps = planning.rps * (1.0 if shadow else weight)  # challenger samples per second
    fraud, recall, declines = planning.fraud_rate, planning.champion_recall, planning.decline_rate
    errors = max(planning.error_rate, 1e-4)
    out: list[Contrast] = []
    for cfg in spec.guardrails_for(kind):
        common = {"name": cfg.name, "min_samples": cfg.min_samples, "levels": levels_for(spec, cfg)}
        if kind == "canary" and weight >= 1 and getattr(cfg, type(cfg).WATCH_LIMIT or "", None) is None:
            continue  # a purely relative guardrail is left out of the 100 % step
        built = _contrast(cfg, shadow, absolute, weight, rps, fraud, recall, declines, errors, planning)
        if built is not None:
            built["variance_good"] *= planning.design_effect
            built["variance_bad"] *= planning.design_effect
            if built["bad"] is not None and built["bad"] <= 0:
                built["bad"] = None  # the drop stays within this guardrail's bound: it cannot see it
            out.append(Contrast(**common, **built))
    return out


def _contrast(
    cfg: GuardrailConfig, shadow: bool, absolute: bool, weight: float, rps: float, fraud: float, recall: float,
    declines: float, errors: float, planning: Planning,
) -> dict[str, Any] | None:  # fmt: skip
    """Fields of a `Contrast` for one guardrail (see `contrasts`)."""
    requests = {"units_per_s": rps, "delay_s": 0.0, "unit": "requests"}
    labelled = {"units_per_s": rps, "delay_s": planning.label_delay_s, "unit": "labelled requests"}
    frauds = {"units_per_s": rps * fraud, "delay_s": planning.label_delay_s, "unit": "labelled frauds"}
    if cfg.kind == "error_rate":
        if absolute:
            v = errors * (1 - errors)
            return {**requests, "good": errors - cfg.max_rate, "bad": None, "variance_good": v, "variance_bad": v,
                    "scale": max(cfg.max_rate / 2, 1e-3), "fail_scale": max(cfg.max_rate / 2, 1e-3)}  # fmt: skip
        # paired (shadow): the difference of two independent error indicators on the same request
        v = 2 * errors * (1 - errors) if shadow else _two_arms(errors * (1 - errors), errors * (1 - errors), weight)
        scale = max(cfg.max_increase, 1e-3)
        return {**requests, "good": -cfg.max_increase, "bad": None, "variance_good": v, "variance_bad": v,
                "scale": scale, "fail_scale": scale}  # fmt: skip
    if cfg.kind == "latency_p99":
        if absolute:
            share = LATENCY_SHARE_ABOVE_BOUND
            v = share * (1 - share)
            return {**requests, "good": share - 0.01, "bad": None, "variance_good": v, "variance_bad": v,
                    "scale": 0.005, "fail_scale": 0.005}  # fmt: skip
        v = _two_arms(0.0099, 0.0099, weight)
        scale = max(0.01 * (cfg.max_ratio_exceedance - 1), 0.005)
        return {**requests, "good": 0.01 * (1 - cfg.max_ratio_exceedance), "bad": None, "variance_good": v,
                "variance_bad": v, "scale": scale, "fail_scale": scale}  # fmt: skip
    if cfg.kind in ("decline_rate", "score_shift"):
        m = cfg.max_change if cfg.kind == "decline_rate" else cfg.max_mass_change
        share = declines / 2 if cfg.kind == "score_shift" else declines  # the scarcer edge (2 x threshold)
        v = share * (DISCORDANT_DECLINES + m * m) if shadow else _two_arms(share, share * (1 + m) ** 2, weight)
        scale = 0.02 * m
        return {**requests, "good": -m * share - MASS_SLACK, "bad": None, "variance_good": v, "variance_bad": v,
                "scale": scale, "fail_scale": scale}  # fmt: skip
    if cfg.kind == "shadow_agreement":
        overlap = 1 - DISCORDANT_DECLINES
        # a proportion over the requests either model declines, in units of paired requests (its min_samples)
        v = overlap * (1 - overlap) / (declines * (1 + DISCORDANT_DECLINES))
        return {**requests, "good": cfg.min_decline_overlap - overlap, "bad": None, "variance_good": v,
                "variance_bad": v, "scale": (1 - cfg.min_decline_overlap) / 2,
                "fail_scale": (1 - cfg.min_decline_overlap) / 2}  # fmt: skip
    if cfg.kind == "online_recall":
        if absolute:
            if cfg.min_recall is None:
                return None
            v = recall * (1 - recall)
            return {**frauds, "good": cfg.min_recall - recall, "bad": cfg.min_recall - recall * 0.8,
                    "variance_good": v, "variance_bad": v, "scale": 0.1, "fail_scale": 0.1}  # fmt: skip
        k = 1 - cfg.max_drop
        scale, bad_scale = recall_scales(cfg)
        if shadow:
            good_var = _paired_recall_variance(recall, planning.discordant_frauds, k, 0.0)
            bad_var = _paired_recall_variance(recall, planning.discordant_frauds, k, PLANNED_RECALL_DROP)
        else:
            r_bad = recall * (1 - PLANNED_RECALL_DROP)
            good_var = _two_arms(recall * (1 - recall), k * k * recall * (1 - recall), weight)
            bad_var = _two_arms(r_bad * (1 - r_bad), k * k * recall * (1 - recall), weight)
        return {**frauds, "good": (k - 1) * recall, "bad": (k - 1 + PLANNED_RECALL_DROP) * recall,
                "variance_good": good_var, "variance_bad": bad_var, "scale": scale,
                "fail_scale": bad_scale}  # fmt: skip
    if cfg.kind == "online_log_loss":
        if absolute:
            if cfg.max_log_loss is None:
                return None
            v = LOG_LOSS_SD**2
            return {**labelled, "good": LOG_LOSS_MEAN - cfg.max_log_loss, "bad": None, "variance_good": v,
                    "variance_bad": v, "scale": 0.05, "fail_scale": 0.05}  # fmt: skip
        f = 1 + cfg.max_increase
        if shadow:
            v = LOG_LOSS_SD**2 * (1 + f * f - 2 * f * LOG_LOSS_CORRELATION)
        else:
            v = _two_arms(LOG_LOSS_SD**2, f * f * LOG_LOSS_SD**2, weight)
        scale = max(0.06 * cfg.max_increase, 1e-3)
        return {**labelled, "good": -cfg.max_increase * LOG_LOSS_MEAN, "bad": None, "variance_good": v,
                "variance_bad": v, "scale": scale, "fail_scale": scale}  # fmt: skip
    return None  # a guardrail kind the planner does not model (yet): it does not delay the plan


def _paired_recall_variance(recall: float, discordant: float, k: float, drop: float) -> float:
    """Variance of d = k hit_champion - hit_challenger per labelled fraud, two retrains disagreeing on
    `discordant` of the frauds (half each way), the challenger then losing `drop` of its catches."""
    both, only_b, only_c = recall - discordant / 2, discordant / 2, discordant / 2
    # the challenger loses `drop` of its catches: of those both caught, the champion alone now catches them
    both, only_b, only_c = both * (1 - drop), only_b + both * drop, only_c * (1 - drop)
    mean = k * (both + only_b) - (both + only_c)
    square = (k - 1) ** 2 * both + k * k * only_b + only_c
    return max(square - mean * mean, 1e-6)


@dataclass(frozen=True)
class PhasePlan:
    """One phase at the planning rate: median seconds to a decision for an identical challenger (pass) and a
    20 % recall drop (fail; None where no guardrail of the phase sees it), and the seconds by which the identical
    challenger has passed with the planner's probability (`sure_pass_s`) and the drop is failed with 80 %
    probability (`power_fail_s`)."""

    name: str
    deadline_s: float | None
    pass_s: float
    sure_pass_s: float
    fail_s: float | None
    power_fail_s: float | None
    bottleneck: str
    # A challenger half as far inside every guardrail's bound as a healthy retrain (on the relative margins: half
    # a margin worse, the benchmark's `inside_margin`): the seconds by which it has passed with probability
    # HALF_MARGIN_PASS. Information only: such a challenger is acceptable, and a deadline shorter than this rolls
    # it back more often than 1 - HALF_MARGIN_PASS; the spec is not refused for it.
    half_margin_pass_s: float = NEVER


def plan(spec: RolloutSpec, planning: Planning | None = None) -> list[PhasePlan]:
    """The plan of every phase, and of the watch when it lasts (see the module docstring)."""
    planning = planning or spec.planning or Planning()
    live = live_phases(spec)
    phases: list[Phase | None] = [*live, None] if spec.post_promotion_watch_s > 0 else list(live)
    sure = 1 - spec.false_rollback_rate / (2 * len(live))
    plans: list[PhasePlan] = []
    for phase in phases:
        parts = contrasts(spec, phase, planning)
        start = _start(phase, planning)
        z_each = float(stats.norm.ppf(1 - (1 - sure) / max(len(parts), 1)))
        passes = {c.name: c.time_to_pass(0.0, start) for c in parts}
        sure_passes = {c.name: c.time_to_pass(z_each, start) for c in parts}
        seeing = [c for c in parts if c.bad is not None]
        fail = min((c.time_to_fail(0.0, start) for c in seeing), default=None)
        power = min((c.time_to_fail(float(stats.norm.ppf(POWER)), start) for c in seeing), default=None)
        bottleneck = max(passes, key=lambda name: passes[name]) if passes else "-"
        z_half = float(stats.norm.ppf(1 - (1 - HALF_MARGIN_PASS) / max(len(parts), 1)))
        half = max((replace(c, good=c.good / 2).time_to_pass(z_half, start) for c in parts), default=start)
        plans.append(
            PhasePlan(
                name="watch" if phase is None else phase.name,
                deadline_s=spec.post_promotion_watch_s if phase is None else phase.max_duration_s,
                pass_s=max(passes.values(), default=start),
                sure_pass_s=max(sure_passes.values(), default=start),
                fail_s=fail,
                power_fail_s=power,
                bottleneck=bottleneck,
                half_margin_pass_s=half,
            )
        )
    return plans


def _start(phase: Phase | None, planning: Planning) -> float:
    """The earliest second a phase can decide: its `min_duration_s` and its `min_samples` at the phase's rate."""
    if phase is None:
        return 0.0
    rate = planning.rps * (1.0 if phase.kind == "shadow" else float(phase.weight or 1.0))
    return max(phase.min_duration_s, phase.min_samples / rate)


def phase_pass_s(spec: RolloutSpec, phase: Phase, planning: Planning) -> float:
    """A phase's median seconds to pass an identical challenger (`PhasePlan.pass_s`), alone: how long a healthy
    rollout stays in it (`monitoring.rollout.slice_plan` measures slices against it)."""
    start = _start(phase, planning)
    return max((c.time_to_pass(0.0, start) for c in contrasts(spec, phase, planning)), default=start)


def live_phases(spec: RolloutSpec) -> list[Phase]:
    """The phases that gather evidence over time: a replay phase is judged once, on requests already logged,
    so it has no rate to plan for."""
    return [phase for phase in spec.phases if phase.kind != "replay"] or list(spec.phases)


def _seconds(value: float) -> str:
    return "never" if not math.isfinite(value) else f"{math.ceil(value)}"


def plan_problems(spec: RolloutSpec) -> list[tuple[tuple[str | int, ...], str]]:
    """Spec-validation problems at the spec's planning rate (none without `planning`), each with its location."""
    if spec.planning is None:
        return []
    p = spec.planning
    at = f"at {p.rps:g} requests/s, {p.fraud_rate:g} fraud, labels {p.label_delay_s:g} s late"
    if p.design_effect != 1:
        at += f", design effect {p.design_effect:g}"
    problems: list[tuple[tuple[str | int, ...], str]] = []
    names = {g.name: i for i, g in enumerate(spec.guardrails)}
    live = live_phases(spec)
    for phase, phase_plan in zip(live, plan(spec), strict=False):
        index = spec.phases.index(phase)
        deadline = phase.max_duration_s
        if deadline is None:
            continue
        for c in contrasts(spec, phase, p):
            if c.samples(deadline) < c.min_samples:
                most = int(c.samples(deadline))
                need = c.delay_s + c.min_samples / c.units_per_s
                problems.append(((("guardrails", names[c.name], "min_samples")), f"{c.min_samples} {c.unit} cannot be "
                                 f"collected before phases[{index}] ({phase.name})'s deadline {at}: at most {most}; "
                                 f"or set phases[{index}].max_duration_s >= {math.ceil(need)}"))  # fmt: skip
        if phase_plan.sure_pass_s > deadline:
            problems.append((("phases", index, "max_duration_s"), f"an identical challenger passes {phase.name} with "
                             f"probability {1 - spec.false_rollback_rate / (2 * len(live)):.4g} only after "
                             f"{_seconds(phase_plan.sure_pass_s)} s {at} (bottleneck: {phase_plan.bottleneck}); "
                             f"must be >= {_seconds(phase_plan.sure_pass_s)}"))  # fmt: skip
        stopped = 1 - spec.false_promotion_rate  # the pass side lets a drop beyond the margin through at most this
        late = phase_plan.power_fail_s is not None and phase_plan.power_fail_s > deadline
        if late and stopped < POWER:
            problems.append((("phases", index, "max_duration_s"), f"a 20 % recall drop is failed in {phase.name} with "
                             f"{POWER:.0%} power only after {_seconds(phase_plan.power_fail_s)} s {at}, and "
                             f"false_promotion_rate {spec.false_promotion_rate:g} lets it pass the deadline with more "
                             f"than {1 - POWER:.0%}; must be >= {_seconds(phase_plan.power_fail_s)} (or "
                             f"false_promotion_rate <= {1 - POWER:g})"))  # fmt: skip
    for index, cfg in enumerate(spec.guardrails):
        if cfg.kind == "online_recall" and cfg.max_drop >= PLANNED_RECALL_DROP and "shadow" in cfg.applies_to:
            problems.append((("guardrails", index, "max_drop"), f"must be < {PLANNED_RECALL_DROP:g}: a 20 % recall "
                             "drop is within this margin, so no sample size gives it power to be caught"))  # fmt: skip
    return problems
