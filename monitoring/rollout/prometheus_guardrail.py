"""The `prometheus` guardrail: a business metric another system exports (chargebacks, a downstream approval
rate), read from a Prometheus server and held to a relative margin against the champion or an absolute bound.

Where the data comes from: on kind, the chart's Prometheus (the controller gets `MLOPS_PROMETHEUS_URL`); on
the embedded default, a Prometheus server when one is configured (`MLOPS_PROMETHEUS_URL`). A spec with a
prometheus guardrail and no URL is refused when the controller loads it (`source_problems`), naming the field.

What it judges (`judge`, pure): at each of the last `looks` evaluation points, `step_s` apart and all within
the current phase, the value of `query` for the candidate (the challenger in a canary, the promoted champion
in the watch) against its limit: `(1 + max_relative_increase) x` the champion's value at the same point in a
canary (`higher_is_better`: `(1 - max_relative_increase) x`, and the candidate must stay above), or `bound`
in the watch and in a canary step the champion no longer serves. The guardrail

- **passes** when the limit holds at every one of the `looks` points,
- **fails** when it is broken at every one of them,
- is **inconclusive** otherwise: the limit held at some points only; fewer than `looks` points fit in the
  phase yet; `samples_query` gives a variant fewer than `min_samples`; or Prometheus is unreachable, answers
  an error, or the query returns nothing or more than one series. The reason is recorded in the result's
  `detail`. An unreachable Prometheus never passes a rollout, and never fails one either.

What it does NOT guarantee
--------------------------
A PromQL value is a point estimate: Prometheus returns no variance, and the query (a ratio of rates over a
window the team chose) may smooth, lag or double-count in ways this code cannot see. So, unlike the
guardrails in `monitoring.rollout.guardrails`, there is no confidence sequence and no control of the false
rollback rate: this guardrail takes no share of the spec's `false_rollback_rate`, and a challenger whose true
value is inside the margin can be rolled back when noise puts its point estimate beyond it. It is a business
bound, stated by the team, not a statistical test. What limits noise-driven decisions is (1) `min_samples`
on the team's own count of evidence, (2) the bound must hold, or break, at `looks` consecutive points
`step_s` apart (choose `step_s` at least the query's rate window, so the points do not share all their
data), and (3) the state machine's `failure_limit` consecutive failed analyses on top. A team that needs a
guarantee should export counts, not ratios, and gate on a log-based guardrail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from monitoring.rollout.guardrails import GuardrailResult
from monitoring.rollout.spec import PrometheusGuardrail, RolloutSpec
from monitoring.rollout.verdicts import Verdict

TEST_NAME = "business bound on a PromQL point estimate at consecutive looks (no confidence sequence)"
KIND = "prometheus"


class PrometheusError(RuntimeError):
    """Prometheus could not answer the query: unreachable, an HTTP or PromQL error, or no single series."""


# ---------------------------------------------------------------- the thin HTTP adapter


class PrometheusClient:
    """Prometheus's HTTP API: `/api/v1/query` and `/api/v1/query_range`, each expected to give one series."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            response = httpx.get(f"{self.base_url}{path}", params=params, timeout=self.timeout_s)
        except httpx.HTTPError as error:
            why = f"{type(error).__name__}: {error}"
            raise PrometheusError(f"Prometheus at {self.base_url} unreachable: {why}") from None
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(f"Prometheus answered HTTP {response.status_code} without JSON") from None
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"Prometheus answered HTTP {response.status_code}: {body.get('error', body)}")
        return dict(body["data"])

    def instant(self, query: str, at: float) -> float | None:
        """The query's one value at `at`, or None when it returns nothing."""
        data = self._get("/api/v1/query", {"query": query, "time": at})
        if data["resultType"] == "scalar":
            return _number(data["result"][1])
        series = _one_series(data["result"], query)
        return None if series is None else _number(series["value"][1])

    def series(self, query: str, start: float, end: float, step_s: float) -> dict[float, float]:
        """The query's values at start, start + step, ..., end (timestamp -> value; missing points absent)."""
        data = self._get("/api/v1/query_range", {"query": query, "start": start, "end": end, "step": step_s})
        series = _one_series(data["result"], query)
        if series is None:
            return {}
        return {round(float(t), 3): v for t, raw in series["values"] if (v := _number(raw)) is not None}


def _number(raw: Any) -> float | None:
    value = float(raw)
    return value if math.isfinite(value) else None


def _one_series(result: list[dict[str, Any]], query: str) -> dict[str, Any] | None:
    if len(result) > 1:
        labels = [r.get("metric", {}) for r in result[:3]]
        raise PrometheusError(f"query returned {len(result)} series (e.g. {labels}); aggregate it to one: {query}")
    return result[0] if result else None


# ---------------------------------------------------------------- what is read, and the pure judgement


@dataclass(frozen=True)
class Reading:
    """What Prometheus gave for one guardrail at one analysis: per variant, the query's value at each look
    (None where it returned nothing) and the samples query's value now; or why it could not be read."""

    looks: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=dict)
    samples: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None


def variant_query(cfg: PrometheusGuardrail, variant: str) -> str:
    if cfg.query is not None:
        return cfg.query.replace("{variant}", variant)
    return str(cfg.query_champion if variant == "champion" else cfg.query_challenger)


def look_times(cfg: PrometheusGuardrail, since: float, at: float) -> list[float]:
    """The `looks` evaluation points ending at `at`, `step_s` apart, or fewer: only those within the phase."""
    times = [at - (cfg.looks - 1 - k) * cfg.step_s for k in range(cfg.looks)]
    return [t for t in times if t >= since]


def read(
    client: PrometheusClient, cfg: PrometheusGuardrail, variants: Sequence[str], since: float, at: float
) -> Reading:
    """Query Prometheus for what `judge` needs; any failure becomes the reading's `error` (inconclusive)."""
    looks = look_times(cfg, since, at)
    try:
        values: dict[str, list[float | None]] = {}
        samples: dict[str, float | None] = {}
        for variant in variants:
            samples[variant] = client.instant(cfg.samples_query.replace("{variant}", variant), at)
            found = client.series(variant_query(cfg, variant), looks[0], looks[-1], cfg.step_s) if looks else {}
            values[variant] = [found.get(round(t, 3)) for t in looks]
    except PrometheusError as error:
        return Reading(looks=looks, error=str(error))
    return Reading(looks=looks, values=values, samples=samples)


def roles(phase_kind: str, champion_serves: bool) -> tuple[str, str | None]:
    """(candidate variant, baseline variant or None for the absolute bound) in a phase: after promotion the
    promoted model answers as the champion."""
    if phase_kind == "watch":
        return "champion", None
    return "challenger", ("champion" if champion_serves else None)


def applies(cfg: PrometheusGuardrail, phase_kind: str, champion_serves: bool) -> bool:
    """As for the log-based guardrails: a purely relative one is left out where the champion serves no one."""
    if phase_kind not in cfg.applies_to:
        return False
    _, baseline = roles(phase_kind, champion_serves)
    return (baseline is not None and cfg.max_relative_increase is not None) or cfg.bound is not None


def _limit_at(cfg: PrometheusGuardrail, baseline_value: float | None, relative: bool) -> float | None:
    if not relative:
        return cfg.bound
    if baseline_value is None or cfg.max_relative_increase is None:
        return None
    factor = 1 - cfg.max_relative_increase if cfg.higher_is_better else 1 + cfg.max_relative_increase
    return baseline_value * factor


def judge(cfg: PrometheusGuardrail, reading: Reading, phase_kind: str, champion_serves: bool) -> GuardrailResult:
    """Pass when the limit holds at every look, fail when it is broken at every look, else inconclusive."""
    candidate, baseline = roles(phase_kind, champion_serves)
    relative = baseline is not None and cfg.max_relative_increase is not None
    arms = [candidate, baseline] if relative and baseline else [candidate]

    # Before a limit is known (no reading yet), report the configured one: the bound, or the relative factor.
    factor = 1 + (-1 if cfg.higher_is_better else 1) * (cfg.max_relative_increase or 0.0)
    configured = factor if relative else float(cfg.bound if cfg.bound is not None else 0.0)

    def result(verdict: Verdict, detail: str, **fields: Any) -> GuardrailResult:
        limit = fields.get("limit")
        return GuardrailResult(
            name=cfg.name,
            verdict=verdict,
            value=fields.get("value"),
            baseline=fields.get("baseline"),
            limit=float(limit if limit is not None else configured),
            samples=int(fields.get("samples", 0)),
            min_samples=cfg.min_samples,
            test=TEST_NAME,
            confidence=0.0,  # no confidence level: a point estimate (see the module docstring)
            p_value=None,
            detail=f"{detail}: {verdict}",
        )

    if reading.error is not None:
        return result("inconclusive", f"no reading: {reading.error}")
    counts = {arm: reading.samples.get(arm) for arm in arms}
    if any(n is None for n in counts.values()):
        missing = ", ".join(arm for arm, n in counts.items() if n is None)
        return result("inconclusive", f"samples_query returned nothing for {missing}")
    fewest = int(min(n for n in counts.values() if n is not None))
    if fewest < cfg.min_samples:
        short = ", ".join(f"{arm} has {n:g}" for arm, n in counts.items() if n is not None and n < cfg.min_samples)
        return result("inconclusive", f"too few samples: {short} < {cfg.min_samples}", samples=fewest)
    if len(reading.looks) < cfg.looks:
        return result(
            "inconclusive",
            f"{len(reading.looks)} of {cfg.looks} looks ({cfg.step_s:g}s apart) fit in the phase so far",
            samples=fewest,
        )
    held = broken = 0
    value = base = limit = None
    gaps = []
    for index in range(len(reading.looks)):
        value = reading.values.get(candidate, [None] * len(reading.looks))[index]
        base = reading.values.get(baseline, [None] * len(reading.looks))[index] if relative and baseline else None
        limit = _limit_at(cfg, base, relative)
        if value is None or limit is None:
            gaps.append(index)
            continue
        within = value >= limit if cfg.higher_is_better else value <= limit
        held, broken = held + within, broken + (not within)
    last = {"value": value, "baseline": base, "limit": limit, "samples": fewest}
    versus = f"{'>=' if cfg.higher_is_better else '<='} {'(1 ' + ('-' if cfg.higher_is_better else '+')}"
    what = f"{candidate} {versus} {cfg.max_relative_increase:g}) x {baseline}" if relative else f"{candidate} vs bound"
    if gaps:
        return result("inconclusive", f"{what}: the query returned nothing at {len(gaps)} of {cfg.looks} looks", **last)
    latest = f"last {value:.6g} vs limit {limit:.6g}"
    if held == cfg.looks:
        return result("pass", f"{what}: held at all {cfg.looks} looks ({latest})", **last)
    if broken == cfg.looks:
        return result("fail", f"{what}: broken at all {cfg.looks} looks ({latest})", **last)
    return result("inconclusive", f"{what}: held at {held} of {cfg.looks} looks", **last)


# ---------------------------------------------------------------- the spec against the settings, and the analysis


def source_problems(spec: RolloutSpec, prometheus_url: str) -> list[str]:
    """A spec with prometheus guardrails needs a Prometheus server: one problem per such guardrail, naming it."""
    if prometheus_url:
        return []
    return [
        f"guardrails[{index}] ({cfg.name}).kind: prometheus needs a Prometheus server; set MLOPS_PROMETHEUS_URL "
        "(settings.prometheus_url) or remove the guardrail"
        for index, cfg in enumerate(spec.guardrails)
        if cfg.kind == KIND
    ]


def evaluate(
    spec: RolloutSpec,
    phase_kind: str,
    champion_serves: bool,
    client: PrometheusClient | None,
    since: float,
    at: float,
) -> list[GuardrailResult]:
    """Every prometheus guardrail of `spec` that applies to the phase, read and judged (without a client, as
    when no URL is configured, each is inconclusive with that reason)."""
    results = []
    for cfg in spec.guardrails:
        if not isinstance(cfg, PrometheusGuardrail) or not applies(cfg, phase_kind, champion_serves):
            continue
        candidate, baseline = roles(phase_kind, champion_serves)
        relative = baseline is not None and cfg.max_relative_increase is not None
        variants = [candidate, baseline] if relative and baseline else [candidate]
        if client is None:
            reading = Reading(error="no Prometheus configured (MLOPS_PROMETHEUS_URL)")
        else:
            reading = read(client, cfg, variants, since, at)
        results.append(judge(cfg, reading, phase_kind, champion_serves))
    return results
