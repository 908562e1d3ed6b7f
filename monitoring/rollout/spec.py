"""The rollout spec: how a challenger is brought to all traffic, and what stops it.

A spec is a YAML file (see `monitoring/rollout/specs/`) validated into a frozen pydantic model:

- `phases`: an optional replay phase first (the last `requests` labelled requests of the prediction log,
  served at least `label_delay_s` ago by the champion, are scored by the challenger's slot through its batch
  endpoint and judged paired against the champion's logged scores: evidence in seconds, before any live
  request), then an optional shadow phase (the challenger scores a copy of the traffic, clients
  never see its answers), then canary phases with strictly increasing traffic weights in (0, 1].
  Each phase lasts at least `min_duration_s` and `min_samples` challenger requests, and at most
  `max_duration_s` (optional): a phase still undecided then rolls back.
- `analysis_interval_s`: how often the controller evaluates the guardrails.
- `failure_limit`: consecutive failed analyses that trigger a rollback (Argo Rollouts' failureLimit).
- `post_promotion_watch_s`: how long a promoted champion is watched against absolute bounds.
- `guardrails`: the checks of `monitoring.rollout.guardrails`, each with the phase kinds it applies to
  (`shadow`, `canary`, `watch`), a minimum sample count and kind-specific limits (margins); the slice kinds
  (`slice_recall`, `slice_decline_rate`, `slice_agreement`, with `slices`: categorical columns of the data
  schema, refused at load otherwise) and the business kind `fraud_amount_caught` are judged by
  `monitoring.rollout.slice_guardrails`.
- `false_rollback_rate` (default 0.01): the rollout-level guarantee. Every guardrail's fail side is an
  anytime-valid bound at its share of this budget (split over the judged (guardrail, phase) pairs by each
  guardrail's `budget_weight`), so a challenger within every margin is rolled back by a failing guardrail with
  probability at most this. `false_promotion_rate` (default 0.05): a challenger beyond one guardrail's margin
  passes it with probability at most this (the pass side).
- `planning` (optional): the traffic the phases are planned for (`rps`, `fraud_rate`, `label_delay_s`, ...);
  when given, `monitoring.rollout.planner` refuses phases that cannot decide at that rate.
- gates: a phase with `require_approval: true` holds after its guardrails pass until `mlops rollout approve`,
  for at most `approval_timeout_s` (then `on_approval_timeout`: `hold` or `rollback`).
- `hooks`: HTTP receivers (see `Hook`): notifications of the rollout's events, and the gating hooks
  `pre-rollout` and `confirm-promotion`, which must answer 2xx for the rollout to go on.

`load_spec` reports every problem at once, each with its location, e.g.
`phases[2].weight: must be in (0, 1], got 1.5`, as a `SpecError` (a `ValueError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.schema import COLUMNS_BY_NAME, SLICE_COLUMNS
from monitoring.rollout.state_machine import DECISION_EVENTS

SPECS_DIR = Path(__file__).resolve().parent / "specs"

PhaseKind = Literal["replay", "shadow", "canary"]
GuardrailPhase = Literal["replay", "shadow", "canary", "watch"]
ReplayOutcome = Literal["advance", "rollback"]
# Fields only a replay phase has (refused on the other kinds).
REPLAY_FIELDS = ("requests", "label_delay_s", "lookback_s", "on_inconclusive")
GUARDRAIL_KINDS = (
    "error_rate",
    "latency_p99",
    "score_shift",
    "shadow_agreement",
    "decline_rate",
    "online_recall",
    "online_log_loss",
    "slice_recall",
    "slice_decline_rate",
    "slice_agreement",
    "fraud_amount_caught",
    "prometheus",
)

Loc = tuple[str | int, ...]


class SpecError(ValueError):
    """An invalid rollout spec. `problems` holds one `location: message` line per problem."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" {source}" if source else ""
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"invalid rollout spec{where} ({count}):\n" + "\n".join(f"  - {p}" for p in problems))


class _Problems(ValueError):
    """Raised by model validators: several problems, each at a location relative to the model."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{_format_loc(loc)}: {msg}" for loc, msg in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _at_least_one(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _fraction(value: float | None, lower_open: bool = True, upper_open: bool = True) -> float | None:
    if value is None:
        return None
    ok_low = value > 0 if lower_open else value >= 0
    ok_high = value < 1 if upper_open else value <= 1
    if not (ok_low and ok_high):
        interval = ("(" if lower_open else "[") + "0, 1" + (")" if upper_open else "]")
        raise ValueError(f"must be in {interval}, got {value}")
    return value


# Single-argument forms of the checks above, for `field_validator(...)(check)`: pydantic passes a validation
# info to a function with a second parameter, so `_fraction`'s options cannot be given there.
def _share(value: float) -> float:
    """A share or a relative margin in (0, 1)."""
    return _fraction(value)  # type: ignore[return-value]


def _margin(value: float) -> float:
    """A margin in [0, 1): 0 allows no regression at all."""
    return _fraction(value, lower_open=False)  # type: ignore[return-value]


def _optional_share(value: float | None) -> float | None:
    return _fraction(value)


def _optional_positive(value: float | None) -> float | None:
    return None if value is None else _positive(value)


def _optional_non_negative(value: float | None) -> float | None:
    return None if value is None else _non_negative(value)


def _error_rate(why: str) -> Callable[[float], float]:
    """A check for a rollout-level error probability: in (0, 0.5), with why 0 is refused."""

    def check(value: float) -> float:
        if not 0 < value < 0.5:
            raise ValueError(f"must be in (0, 0.5), got {value}: {why}")
        return value

    return check


class Phase(_Strict):
    """One step of the rollout. Replay and shadow phases have no weight; canary phases send `weight` of the
    traffic.

    A replay phase is judged once, on a fixed sample: the last `requests` labelled requests the champion
    answered at least `label_delay_s` ago (labels have had time to arrive) and at most `lookback_s` ago,
    replayed through the challenger's slot. Any failing guardrail rolls back at once (a second look would
    replay the same requests); all passing with `min_samples` replayed advances; anything else (too few
    labelled requests, as on a model's first rollout, or an inconclusive guardrail) does what
    `on_inconclusive` says: `advance` (the live phases gather the evidence; the default) or `rollback`."""

    name: str
    kind: PhaseKind
    weight: float | None = None
    min_duration_s: float
    min_samples: int
    requests: int | None = None
    label_delay_s: float | None = None
    lookback_s: float | None = None
    on_inconclusive: ReplayOutcome | None = None
    # The progress deadline (like Flagger's progressDeadlineSeconds): a phase whose guardrails still have not
    # all passed after this long rolls back instead of waiting forever on evidence that does not come.
    max_duration_s: float | None = None
    # A manual gate (Argo's indefinite pause): after the guardrails pass, hold until approved.
    require_approval: bool = False
    approval_timeout_s: float | None = None
    on_approval_timeout: GateOutcome = "rollback"

    _name = field_validator("name")(_non_empty)
    _duration = field_validator("min_duration_s")(_non_negative)
    _samples = field_validator("min_samples")(_at_least_one)
    _delays = field_validator("label_delay_s")(_optional_non_negative)
    _lookback = field_validator("lookback_s")(_optional_positive)

    @model_validator(mode="before")
    @classmethod
    def _replay_defaults(cls, data: Any) -> Any:
        """A replay phase is judged once, so it has no minimum duration; its other fields have defaults."""
        if isinstance(data, Mapping) and data.get("kind") == "replay":
            defaults = {"min_duration_s": 0.0, "label_delay_s": 0.0, "lookback_s": 3600.0, "on_inconclusive": "advance"}
            return {**defaults, **data}
        return data

    @field_validator("requests")
    @classmethod
    def _requests(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be > 0, got {value}: a replay phase replays at least one request")
        return value

    @model_validator(mode="after")
    def _deadline_after_minimum(self) -> Phase:
        if self.max_duration_s is not None and self.max_duration_s < max(self.min_duration_s, 1e-9):
            raise ValueError(
                f"max_duration_s ({self.max_duration_s:g}) must be > 0 and at least min_duration_s "
                f"({self.min_duration_s:g})"
            )
        return self

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float | None) -> float | None:
        return _fraction(value, lower_open=True, upper_open=False)

    _approval_timeout = field_validator("approval_timeout_s")(_optional_positive)


class _GuardrailBase(_Strict):
    """Fields every guardrail has. Subclasses name the phases they support and their absolute (watch) bound."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("replay", "shadow", "canary", "watch")
    UNSUPPORTED_WHY: ClassVar[str] = ""
    WATCH_LIMIT: ClassVar[str | None] = None  # the absolute-bound field a `watch` evaluation needs
    USES_LABELS: ClassVar[bool] = False  # judged on labelled feedback (its detail counts ignored labels)

    name: str
    applies_to: list[GuardrailPhase]
    min_samples: int
    # Ignored, kept so older specs load: each guardrail's level now comes from the spec's false_rollback_rate,
    # split across guardrails and phases (`monitoring.rollout.guardrails.error_budget`).
    confidence: float | None = None
    # This guardrail's share of the spec's false_rollback_rate, relative to the others' (a weighted Bonferroni
    # split over the (guardrail, phase) pairs judged; `monitoring.rollout.guardrails.error_budget`).
    budget_weight: float = 1.0

    _name = field_validator("name")(_non_empty)
    _samples = field_validator("min_samples")(_at_least_one)
    _weight = field_validator("budget_weight")(_positive)

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, value: float | None) -> float | None:
        if value is not None and not 0.5 <= value < 1:
            raise ValueError(f"must be in [0.5, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _phases(self) -> _GuardrailBase:
        problems: list[tuple[Loc, str]] = []
        if not self.applies_to:
            problems.append((("applies_to",), "must name at least one of shadow, canary, watch"))
        seen: set[str] = set()
        for index, phase in enumerate(self.applies_to):
            if phase in seen:
                problems.append((("applies_to", index), f"duplicate phase kind {phase!r}"))
            seen.add(phase)
            if phase not in self.SUPPORTED:
                why = f" ({self.UNSUPPORTED_WHY})" if self.UNSUPPORTED_WHY else ""
                problems.append(
                    (
                        ("applies_to", index),
                        f"{self.kind_name()} cannot apply to {phase!r}{why}; supported: {', '.join(self.SUPPORTED)}",
                    )
                )
        if "watch" in self.applies_to and self.WATCH_LIMIT and getattr(self, self.WATCH_LIMIT) is None:
            problems.append(
                ((self.WATCH_LIMIT,), "required when applies_to includes 'watch' (the bound a promoted champion keeps)")
            )
        if problems:
            raise _Problems(problems)
        return self

    def kind_name(self) -> str:
        return str(getattr(self, "kind", type(self).__name__))


class ErrorRateGuardrail(_GuardrailBase):
    """Challenger error rate may exceed the champion's by at most `max_increase` (absolute); watch: <= `max_rate`."""

    WATCH_LIMIT: ClassVar[str | None] = "max_rate"

    kind: Literal["error_rate"]
    max_increase: float = 0.01
    max_rate: float | None = None

    _increase = field_validator("max_increase")(_margin)
    _rate = field_validator("max_rate")(_optional_share)


class LatencyP99Guardrail(_GuardrailBase):
    """At most 1 % x `max_ratio_exceedance` of challenger requests may be slower than the champion's p99;
    watch: p99 <= `max_p99_ms`."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("canary", "watch")
    UNSUPPORTED_WHY: ClassVar[str] = "replay and shadow latency is measured per batch, not per request"
    WATCH_LIMIT: ClassVar[str | None] = "max_p99_ms"

    kind: Literal["latency_p99"]
    max_ratio_exceedance: float = 2.0
    max_p99_ms: float | None = None

    @field_validator("max_ratio_exceedance")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 1 <= value < 100:
            raise ValueError(f"must be in [1, 100), got {value}")
        return value

    _p99 = field_validator("max_p99_ms")(_optional_positive)


class ScoreShiftGuardrail(_GuardrailBase):
    """Score shift in the decision region: the share of scores >= threshold/2 and >= 2 x threshold may change by
    at most `max_mass_change` (relative) from the champion's. PSI over `bins` champion quantiles plus the edges
    threshold/2, threshold, 2 x threshold is reported, not judged: a shift where no decision changes is no
    regression."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("replay", "shadow", "canary")
    UNSUPPORTED_WHY: ClassVar[str] = "after promotion there is no champion to compare scores with"

    kind: Literal["score_shift"]
    max_mass_change: float = 0.5
    bins: int = 10

    _mass = field_validator("max_mass_change")(_positive)

    @field_validator("bins")
    @classmethod
    def _bins(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"must be >= 2, got {value}")
        return value


class ShadowAgreementGuardrail(_GuardrailBase):
    """Chance-corrected agreement in shadow: of the requests either model declines, at least
    `min_decline_overlap` must be declined by both (the overlap of the two decline sets, Jaccard). A challenger
    whose decisions are independent of the champion's has an overlap near the decline rate (~0.01)."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("replay", "shadow")
    UNSUPPORTED_WHY: ClassVar[str] = "only the replay and shadow phases score the same requests with both models"

    kind: Literal["shadow_agreement"]
    min_decline_overlap: float = 0.5

    _overlap = field_validator("min_decline_overlap")(_share)


class DeclineRateGuardrail(_GuardrailBase):
    """The challenger's decline rate (share of scores >= the decision threshold; no labels needed) may differ
    from the champion's by at most `max_change` relative, either way."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("replay", "shadow", "canary")
    UNSUPPORTED_WHY: ClassVar[str] = "after promotion there is no champion to compare decline rates with"

    kind: Literal["decline_rate"]
    max_change: float = 0.3

    _change = field_validator("max_change")(_share)


class OnlineRecallGuardrail(_GuardrailBase):
    """Challenger recall on labelled frauds may be at most `max_drop` (relative) below the champion's;
    watch: >= `min_recall`."""

    WATCH_LIMIT: ClassVar[str | None] = "min_recall"
    USES_LABELS: ClassVar[bool] = True

    kind: Literal["online_recall"]
    max_drop: float = 0.1
    min_recall: float | None = None

    _drop = field_validator("max_drop")(_margin)
    _recall = field_validator("min_recall")(_optional_share)


class OnlineLogLossGuardrail(_GuardrailBase):
    """Challenger mean log loss may be at most (1 + `max_increase`) x the champion's; watch: <= `max_log_loss`."""

    WATCH_LIMIT: ClassVar[str | None] = "max_log_loss"
    USES_LABELS: ClassVar[bool] = True

    kind: Literal["online_log_loss"]
    max_increase: float = 0.1
    max_log_loss: float | None = None

    _increase = field_validator("max_increase")(_non_negative)
    _bound = field_validator("max_log_loss")(_optional_positive)


def _slice_column_problems(columns: list[str]) -> list[tuple[Loc, str]]:
    """Every slice column must be a categorical column of the data schema (core/schema.py): the gateway logs
    exactly those, so a column it does not have could never be judged."""
    problems: list[tuple[Loc, str]] = []
    categorical = [c.name for c in COLUMNS_BY_NAME.values() if c.kind == "categorical"]
    if not columns:
        problems.append(((), f"must name at least one column; slice columns: {', '.join(categorical)}"))
    for index, column in enumerate(columns):
        if column not in categorical:
            what = "not a categorical column" if column in COLUMNS_BY_NAME else "not a column"
            problems.append(
                (
                    (index,),
                    f"{column!r} is {what} of the data schema (core/schema.py); "
                    f"slice columns: {', '.join(categorical)}",
                )
            )
        elif column in columns[:index]:
            problems.append(((index,), f"duplicate slice column {column!r}"))
    return problems


class _SliceGuardrailBase(_GuardrailBase):
    """A guardrail judged per slice: per value of each column in `slices` (categorical columns of the data
    schema, which the prediction log carries), each slice with its own `min_samples`. The guardrail's share of
    the error budget is split again, Bonferroni, over every slice its columns can have (the schema's
    categories), see `monitoring.rollout.slice_guardrails`."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("shadow", "canary")
    UNSUPPORTED_WHY: ClassVar[str] = "after promotion there is no champion to compare slices with"

    slices: list[str] = Field(default_factory=lambda: list(SLICE_COLUMNS))

    @field_validator("slices")
    @classmethod
    def _slice_columns(cls, value: list[str]) -> list[str]:
        problems = _slice_column_problems(value)
        if problems:
            raise _Problems(problems)
        return value


class SliceRecallGuardrail(_SliceGuardrailBase):
    """Per slice, challenger recall on labelled frauds at most `max_drop` (relative) below the champion's;
    `min_samples` counts the slice's labelled frauds.

    `max_drop_by_slice` (`{"merchant_category=health": 0.7}`) gives a slice its own margin. Why: in a slice with
    few frauds, healthy retrains of the same recipe differ by more than a whole-traffic margin (a model trained on
    60,000 rows sees a dozen fuel frauds; `benchmarks/slice_power.py` measures the spread), and a retrain must be
    promoted, so such a slice's margin has to exceed that spread. Each slice's level is unchanged (Bonferroni
    over all slices), so the guarantee holds per slice at its own margin."""

    kind: Literal["slice_recall"]
    max_drop: float = 0.3
    max_drop_by_slice: dict[str, float] = Field(default_factory=dict)

    _drop = field_validator("max_drop")(_margin)

    @model_validator(mode="after")
    def _slice_margins(self) -> SliceRecallGuardrail:
        known = {f"{column}={category}" for column in self.slices for category in COLUMNS_BY_NAME[column].categories}
        problems: list[tuple[Loc, str]] = []
        for key, drop in self.max_drop_by_slice.items():
            if key not in known:
                problems.append(
                    (
                        ("max_drop_by_slice", key),
                        f"not a slice of this guardrail's columns ({', '.join(self.slices)}); "
                        "write it as column=category, e.g. merchant_category=fuel",
                    )
                )
            elif not 0.0 <= drop < 1.0:
                problems.append((("max_drop_by_slice", key), f"must be in [0, 1), got {drop}"))
        if problems:
            raise _Problems(problems)
        return self

    def drop_for(self, key: str) -> float:
        """The margin of one slice ("column=category"): its own, or the guardrail's `max_drop`."""
        return self.max_drop_by_slice.get(key, self.max_drop)


class SliceDeclineRateGuardrail(_SliceGuardrailBase):
    """Per slice, the challenger's decline rate within `max_change` (relative, either way) of the champion's;
    `min_samples` counts the slice's scored requests (no labels needed)."""

    kind: Literal["slice_decline_rate"]
    max_change: float = 0.4

    _change = field_validator("max_change")(_share)


class SliceAgreementGuardrail(_SliceGuardrailBase):
    """Per slice, in shadow: of the requests either model declines, at least `min_decline_overlap` declined by
    both; `min_samples` counts the slice's requests declined by either model."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("shadow",)
    UNSUPPORTED_WHY: ClassVar[str] = "only the shadow phase scores the same requests with both models"

    kind: Literal["slice_agreement"]
    min_decline_overlap: float = 0.4

    _overlap = field_validator("min_decline_overlap")(_share)


class FraudAmountCaughtGuardrail(_GuardrailBase):
    """The business guardrail: the fraud amount (EUR, the `amount` of labelled frauds declined) the challenger
    catches may be at most `max_drop` (relative) below what the champion catches, e.g. 0.05: "roll back if the
    fraud amount caught drops by more than 5 %". `min_samples` counts labelled frauds."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("shadow", "canary")
    UNSUPPORTED_WHY: ClassVar[str] = "after promotion there is no champion to compare the amount caught with"

    kind: Literal["fraud_amount_caught"]
    max_drop: float = 0.1

    _drop = field_validator("max_drop")(_margin)


class PrometheusGuardrail(_GuardrailBase):
    """A business metric another system exports, read from Prometheus (monitoring.rollout.prometheus_guardrail):
    `query` with a `{variant}` placeholder (or `query_champion` and `query_challenger`) must return one series;
    canary: challenger <= (1 + `max_relative_increase`) x champion (`higher_is_better`: >= (1 - it) x champion);
    watch, and a canary step the champion no longer serves: the value against `bound`. `samples_query` (same
    placeholder) counts each variant's evidence against `min_samples`. A point estimate, no confidence
    sequence: it passes or fails only when the bound holds, or breaks, at each of `looks` evaluation points
    `step_s` apart within the phase."""

    SUPPORTED: ClassVar[tuple[str, ...]] = ("canary", "watch")
    UNSUPPORTED_WHY: ClassVar[str] = "in shadow the challenger serves no one, so a business metric has no value for it"
    WATCH_LIMIT: ClassVar[str | None] = "bound"

    kind: Literal["prometheus"]
    query: str | None = None
    query_champion: str | None = None
    query_challenger: str | None = None
    samples_query: str
    higher_is_better: bool = False
    max_relative_increase: float | None = None
    bound: float | None = None
    looks: int = 3
    step_s: float = 15.0

    _looks = field_validator("looks")(_at_least_one)
    _step = field_validator("step_s")(_positive)
    _margin = field_validator("max_relative_increase")(_optional_non_negative)

    @model_validator(mode="after")
    def _queries(self) -> PrometheusGuardrail:
        problems: list[tuple[Loc, str]] = []
        pair = (self.query_champion, self.query_challenger)
        per_variant = "query_champion and query_challenger"
        if self.query is not None and any(pair):
            problems.append((("query",), f"give query (with {{variant}}) or {per_variant}, not both"))
        elif self.query is None and not all(pair):
            problems.append((("query",), f"required: a PromQL query with {{variant}}, or {per_variant}"))
        elif self.query is not None and "{variant}" not in self.query:
            problems.append((("query",), f"must contain the {{variant}} placeholder (or give {per_variant})"))
        if "{variant}" not in self.samples_query:
            problems.append((("samples_query",), "must contain the {variant} placeholder: each variant's samples"))
        if self.max_relative_increase is None and self.bound is None:
            problems.append((("max_relative_increase",), "give a relative margin, an absolute bound, or both"))
        if problems:
            raise _Problems(problems)
        return self


GateOutcome = Literal["hold", "rollback"]
# A hook may subscribe to the event of any decision the state machine records, but for the two that are not
# offered to hooks: a reset failure streak and a slot outage.
HOOK_NOTIFICATIONS = tuple(event for event in DECISION_EVENTS if event not in ("streak-reset", "slot-down"))
HOOK_GATES = ("pre-rollout", "confirm-promotion")
HOOK_EVENTS = HOOK_NOTIFICATIONS + HOOK_GATES


class Hook(_Strict):
    """An HTTP receiver. Notification events are POSTed (signed, off the controller's loop, with retries);
    the gating events `pre-rollout` (before any traffic moves) and `confirm-promotion` (before the step to
    100 %, or before the phase named by `phase` advances) are called until they answer 2xx, for at most
    `gate_timeout_s`, then `on_timeout` decides: `hold` (wait for a person) or `rollback`."""

    name: str
    url: str
    events: list[str]
    format: Literal["json", "slack"] = "json"
    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 1.0
    gate_timeout_s: float = 300.0
    on_timeout: GateOutcome = "rollback"
    phase: str | None = None

    _name = field_validator("name")(_non_empty)
    _timeout = field_validator("timeout_s", "gate_timeout_s")(_positive)
    _backoff = field_validator("backoff_s")(_non_negative)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
        return value

    @field_validator("retries")
    @classmethod
    def _retries(cls, value: int) -> int:
        if not 0 <= value <= 10:
            raise ValueError(f"must be in [0, 10], got {value}")
        return value

    @model_validator(mode="after")
    def _events(self) -> Hook:
        problems: list[tuple[Loc, str]] = []
        if not self.events:
            problems.append((("events",), f"must name at least one of {', '.join(HOOK_EVENTS)}"))
        for index, event in enumerate(self.events):
            if event not in HOOK_EVENTS:
                problems.append((("events", index), f"unknown event {event!r}; one of {', '.join(HOOK_EVENTS)}"))
        if self.phase is not None and "confirm-promotion" not in self.events:
            problems.append((("phase",), "only a confirm-promotion hook names the phase it gates"))
        if problems:
            raise _Problems(problems)
        return self

    @property
    def gates(self) -> list[str]:
        return [event for event in self.events if event in HOOK_GATES]


class Planning(_Strict):
    """The traffic a spec is planned for (`monitoring.rollout.planner`): its phases must be able to decide at this
    rate. The champion's figures are planning assumptions of the power calculation, not measured."""

    rps: float = 200.0
    fraud_rate: float = 0.02
    label_delay_s: float = 30.0
    champion_recall: float = 0.6  # at the decision threshold
    decline_rate: float = 0.025
    error_rate: float = 0.001
    # Share of labelled frauds that exactly one of two healthy retrains catches: the noise of the paired recall
    # test (3.5 % for the benchmark's logistic models, ~14 % for the scenarios' small MLPs).
    discordant_frauds: float = 0.035
    # How much account clustering widens the guardrails' intervals: the cluster-robust variance of a mean over the
    # phase's requests divided by the independent-requests one (sticky routing, an account's correlated labels).
    # 1 is independent requests; measure yours with `mlops rollout design-effect` over a window as long as the
    # longest phase. The planner multiplies every contrast's variance by it.
    design_effect: float = 1.0

    _rps = field_validator("rps")(_positive)
    _delay = field_validator("label_delay_s")(_non_negative)
    _shares = field_validator("fraud_rate", "champion_recall", "decline_rate", "discordant_frauds")(_share)
    _errors = field_validator("error_rate")(_margin)

    @field_validator("design_effect")
    @classmethod
    def _design_effect(cls, value: float) -> float:
        if not (math.isfinite(value) and value >= 1):
            raise ValueError(
                f"must be >= 1 (clustered requests carry less information than independent ones, never more), "
                f"got {value}"
            )
        return value


GuardrailConfig = Annotated[
    ErrorRateGuardrail
    | LatencyP99Guardrail
    | ScoreShiftGuardrail
    | ShadowAgreementGuardrail
    | DeclineRateGuardrail
    | OnlineRecallGuardrail
    | OnlineLogLossGuardrail
    | SliceRecallGuardrail
    | SliceDeclineRateGuardrail
    | SliceAgreementGuardrail
    | FraudAmountCaughtGuardrail
    | PrometheusGuardrail,
    Field(discriminator="kind"),
]


class RolloutSpec(_Strict):
    """A validated rollout spec (see the module docstring)."""

    name: str
    phases: list[Phase]
    analysis_interval_s: float
    failure_limit: int
    post_promotion_watch_s: float
    guardrails: list[GuardrailConfig]
    hooks: list[Hook] = []
    # The rollout-level guarantee: the probability that a challenger within every margin is rolled back by a
    # failing guardrail, at any look of any phase or of the watch, is at most this. Split evenly (Bonferroni)
    # over the (guardrail, phase) pairs that are judged; see monitoring.rollout.guardrails.
    false_rollback_rate: float = 0.01
    # The pass side: a challenger beyond one guardrail's margin passes that guardrail (and so can be promoted)
    # with probability at most this. It costs no false rollbacks, so it is not split.
    false_promotion_rate: float = 0.05
    # The traffic the phases are planned for; validated by `monitoring.rollout.planner` (None: not planned).
    planning: Planning | None = None
    # While paused (`mlops rollout pause`), a failing guardrail still rolls back ("rollback"), or is only
    # recorded until the rollout is resumed ("hold").
    on_failure_while_paused: GateOutcome = "rollback"

    _name = field_validator("name")(_non_empty)
    _interval = field_validator("analysis_interval_s")(_positive)
    _failures = field_validator("failure_limit")(_at_least_one)
    _watch = field_validator("post_promotion_watch_s")(_non_negative)

    _budget = field_validator("false_rollback_rate")(_error_rate("an error budget <= 0 cannot be guaranteed"))
    _pass_level = field_validator("false_promotion_rate")(_error_rate("a pass error <= 0 can never pass"))

    @model_validator(mode="after")
    def _consistent(self) -> RolloutSpec:
        problems = _cross_field_problems(self.model_dump())
        if problems:
            raise _Problems(problems)
        # Imported here: the planner models the guardrails, which read this module's types.
        from monitoring.rollout.planner import plan_problems

        planned = plan_problems(self)
        if planned:
            raise _Problems(planned)
        return self

    @property
    def shadow_phase(self) -> Phase | None:
        return next((phase for phase in self.phases if phase.kind == "shadow"), None)

    @property
    def replay_phase(self) -> Phase | None:
        return self.phases[0] if self.phases[0].kind == "replay" else None

    @property
    def canary_phases(self) -> list[Phase]:
        return [phase for phase in self.phases if phase.kind == "canary"]

    def hooks_for(self, event: str) -> list[Hook]:
        return [hook for hook in self.hooks if event in hook.events]

    def confirm_promotion_phase(self, hook: Hook) -> str:
        """The phase a confirm-promotion hook gates: its `phase`, else the one before the step to 100 % (the
        last phase when no phase has weight 1: its passing promotes)."""
        if hook.phase is not None:
            return hook.phase
        for index, phase in enumerate(self.phases):
            if phase.kind == "canary" and phase.weight == 1.0 and index > 0:
                return self.phases[index - 1].name
        return self.phases[-1].name

    def guardrails_for(self, phase_kind: str) -> list[GuardrailConfig]:
        """The guardrails evaluated in a phase of this kind (`shadow`, `canary` or `watch`)."""
        return [guardrail for guardrail in self.guardrails if phase_kind in guardrail.applies_to]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cross_field_problems(data: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """Checks across phases and guardrails, tolerant of malformed entries (those are reported elsewhere),
    so they run on raw YAML too and a spec's problems are all listed at once."""
    problems: list[tuple[Loc, str]] = []
    phases = data.get("phases")
    if isinstance(phases, list):
        if not phases:
            problems.append((("phases",), "at least one phase is required"))
        previous: tuple[int, float] | None = None
        names: dict[str, int] = {}
        for index, phase in enumerate(phases):
            if not isinstance(phase, Mapping):
                continue
            name, kind, weight = phase.get("name"), phase.get("kind"), phase.get("weight")
            if isinstance(name, str) and name.strip():
                if name in names:
                    problems.append(
                        (("phases", index, "name"), f"duplicate phase name {name!r} (also phases[{names[name]}])")
                    )
                names.setdefault(name, index)
            first_kind = phases[0].get("kind") if isinstance(phases[0], Mapping) else None
            if kind == "replay":
                if index != 0:
                    problems.append((("phases", index, "kind"), "only the first phase may be a replay phase"))
                if weight is not None:
                    problems.append((("phases", index, "weight"), "only canary phases have a weight"))
                requests, minimum = phase.get("requests"), phase.get("min_samples")
                if requests is None:
                    problems.append((("phases", index, "requests"), "required for a replay phase: how many, > 0"))
                elif _is_number(requests) and _is_number(minimum) and 0 < requests < minimum:
                    problems.append(
                        (
                            ("phases", index, "min_samples"),
                            f"must be <= requests ({requests:g}): a replay of {requests:g} requests never reaches "
                            f"{minimum:g} samples",
                        )
                    )
            else:
                for key in REPLAY_FIELDS:
                    if phase.get(key) is not None:
                        problems.append((("phases", index, key), "only a replay phase has this field"))
            if kind == "shadow":
                if index != 0 and not (index == 1 and first_kind == "replay"):
                    problems.append(
                        (("phases", index, "kind"), "only the first phase (or the one after replay) may be shadow")
                    )
                if weight is not None:
                    problems.append((("phases", index, "weight"), "only canary phases have a weight"))
            elif kind == "canary":
                if weight is None:
                    problems.append((("phases", index, "weight"), "required for a canary phase, in (0, 1]"))
                elif _is_number(weight) and 0 < weight <= 1:
                    if previous is not None and weight <= previous[1]:
                        problems.append(
                            (
                                ("phases", index, "weight"),
                                f"must be greater than phases[{previous[0]}].weight ({previous[1]:g}): "
                                "canary weights increase strictly",
                            )
                        )
                    previous = (index, weight)
    guardrails = data.get("guardrails")
    if isinstance(guardrails, list):
        if not guardrails:
            problems.append((("guardrails",), "at least one guardrail is required"))
        seen: dict[str, int] = {}
        for index, guardrail in enumerate(guardrails):
            name = guardrail.get("name") if isinstance(guardrail, Mapping) else None
            if isinstance(name, str) and name in seen:
                problems.append(
                    (
                        ("guardrails", index, "name"),
                        f"duplicate guardrail name {name!r} (also guardrails[{seen[name]}])",
                    )
                )
            if isinstance(name, str):
                seen.setdefault(name, index)
    problems += _gate_and_hook_problems(data)
    return problems


def _gate_and_hook_problems(data: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """Gates name phases that exist; a phase's gate settings only come with `require_approval`; hook names are
    unique (tolerant of malformed entries, like `_cross_field_problems`)."""
    problems: list[tuple[Loc, str]] = []
    phases = data.get("phases") if isinstance(data.get("phases"), list) else []
    names = [p.get("name") for p in phases if isinstance(p, Mapping)]
    for index, phase in enumerate(phases):
        if not isinstance(phase, Mapping) or phase.get("require_approval"):
            continue
        for key, default in (("approval_timeout_s", None), ("on_approval_timeout", "rollback")):
            if phase.get(key, default) != default:
                problems.append((("phases", index, key), "only with require_approval: true"))
    hooks = data.get("hooks")
    if isinstance(hooks, list):
        seen: dict[str, int] = {}
        for index, hook in enumerate(hooks):
            if not isinstance(hook, Mapping):
                continue
            name, phase = hook.get("name"), hook.get("phase")
            if isinstance(name, str) and name in seen:
                problems.append((("hooks", index, "name"), f"duplicate hook name {name!r} (also hooks[{seen[name]}])"))
            if isinstance(name, str):
                seen.setdefault(name, index)
            if isinstance(phase, str) and phase not in names:
                known = ", ".join(repr(n) for n in names if isinstance(n, str))
                problems.append((("hooks", index, "phase"), f"no phase named {phase!r} (phases: {known})"))
    return problems


def _format_loc(loc: Loc) -> str:
    text = ""
    for position, item in enumerate(loc):
        if isinstance(item, int):
            text += f"[{item}]"
        elif item in GUARDRAIL_KINDS and position >= 2 and loc[position - 2] == "guardrails":
            continue  # pydantic's discriminated-union tag: `guardrails[0].error_rate.max_increase`
        else:
            text += f".{item}" if text else item
    return text or "<spec>"


def format_location(loc: Loc) -> str:
    """A problem's location as the spec's problems name it, e.g. `phases[0].max_duration_s`."""
    return _format_loc(loc)


def _problems_from(error: ValidationError) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for item in error.errors():
        loc: Loc = tuple(item["loc"])
        kind = item["type"]
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            problems.extend((loc + relative, message) for relative, message in cause.problems)
        elif kind == "missing":
            problems.append((loc, "required"))
        elif kind == "extra_forbidden":
            problems.append((loc, "unknown field"))
        elif kind == "union_tag_invalid":
            got = item["input"].get("kind") if isinstance(item["input"], Mapping) else None
            problems.append(((*loc, "kind"), f"must be one of {', '.join(GUARDRAIL_KINDS)}, got {got!r}"))
        elif kind == "union_tag_not_found":
            problems.append(((*loc, "kind"), f"required, one of {', '.join(GUARDRAIL_KINDS)}"))
        elif kind == "value_error":
            problems.append((loc, str(cause) if cause is not None else item["msg"]))
        else:
            value = item.get("input")
            got = f", got {value!r}" if isinstance(value, str | int | float | bool) else ""
            problems.append((loc, f"{item['msg']}{got}"))
    return problems


def _document_order(loc: Loc) -> tuple[int, int]:
    """Sort key: problems in the order of the spec's fields, then by list index."""
    top = list(RolloutSpec.model_fields).index(loc[0]) if loc and loc[0] in RolloutSpec.model_fields else -1
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
    return top, index


def _read(source: str | Path | Mapping[str, Any]) -> tuple[str | None, Any]:
    if isinstance(source, Mapping):
        return None, dict(source)
    text: str
    origin: str | None = None
    if isinstance(source, Path) or ("\n" not in source and source.strip().endswith((".yaml", ".yml"))):
        path = Path(source)
        origin = str(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise SpecError([f"<file>: cannot read {path}: {error.strerror or error}"], origin) from None
    else:
        text = source
    try:
        return origin, yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<yaml>"
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError([f"{where}: not valid YAML: {problem}"], origin) from None


def load_spec(source: str | Path | Mapping[str, Any]) -> RolloutSpec:
    """Load and validate a rollout spec from a path (a `Path`, or a string ending in .yaml/.yml), YAML text
    or an already-parsed mapping. Raises `SpecError` listing every problem, each with its location."""
    origin, data = _read(source)
    if not isinstance(data, Mapping):
        raise SpecError([f"<spec>: must be a YAML mapping, got {type(data).__name__}"], origin)
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as error:
        found = sorted(
            _problems_from(error) + _cross_field_problems(data), key=lambda problem: _document_order(problem[0])
        )
        lines = list(dict.fromkeys(f"{_format_loc(loc)}: {message}" for loc, message in found))
        raise SpecError(lines, origin) from None


def default_spec() -> RolloutSpec:
    """The production rollout: shadow, then 5 -> 25 -> 50 -> 100 % canary (`specs/default.yaml`)."""
    return load_spec(SPECS_DIR / "default.yaml")


def fast_spec() -> RolloutSpec:
    """The same rollout compressed to seconds, for tests and scenarios (`specs/fast.yaml`)."""
    return load_spec(SPECS_DIR / "fast.yaml")


def spec_from_setting(value: str) -> RolloutSpec:
    """`MLOPS_ROLLOUT_SPEC`: a bundled spec name (`default`, `fast`) or a path to a YAML file."""
    bundled = SPECS_DIR / f"{value}.yaml"
    return load_spec(bundled if bundled.exists() else Path(value))
