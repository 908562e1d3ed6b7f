"""A scenario file (`scenarios/*.yaml`): the challenger, the traffic, an optional fault, the expected outcome.

Example::

    name: latency-regression
    description: a slower challenger is rolled back on p99 latency
    challenger: {seed: 2, defect: {extra_latency_ms: 120}}
    traffic: {rps: 150, label_delay_s: 2, fraud_rate: 0.03}
    expect: {outcome: rolled_back, within_s: 120, reason_contains: latency}

- `challenger.seed`: the trained model the challenger is built from (trained once, then cached);
  `defect` bakes a deliberate fault into a wrapper of it (`serving.slot.Defect`), optionally confined to one
  slice: `defect: {slice: {merchant_category: electronics}, score_scale_above: 0.3}`; `fault: {when, defect}`
  switches one on in the challenger's slot at run time, once the rollout reaches status `when` (e.g. a
  model that degrades after its promotion).
- `chaos.kill`: the stack service the fault hits: `mlflow`, `control-plane`, `gateway`, `champion-slot`,
  `challenger-slot`, `controller` or `drift-monitor`; `chaos.action`: `kill` (SIGKILL of its whole group, the
  default), `hang` (SIGSTOP of every member for `chaos.for_s` seconds, then SIGCONT: a process that is there but
  answers nothing, like a slow disk or a long GC pause) or `restart` (SIGTERM, a graceful stop the supervisor
  follows with a new process); done as soon as the rollout reaches `chaos.when`: a status (`shadow`, `canary`,
  `promoted_watching`) or a list of them, once in each.
- `group`: a tag (`faults` for the fault matrix) that `mlops scenario` can select (`--group faults`) or leave out
  (`--exclude-group faults`).
- `challenger.source: retrained`: no challenger is built; drifted traffic must make the drift monitor submit a
  retraining run whose model then goes through a guarded rollout (`expect.retrain: true`, outcome `decided`:
  any decision), or clean traffic must trigger nothing for `traffic.duration_s` (`outcome: none`).
- `expect.outcome`: `promoted`, `rolled_back` (before promotion) or `rolled_back_after_promotion`;
  `within_s` bounds the time from the rollout's start to that decision; `max_challenger_weight` bounds the
  live traffic the challenger ever got; `max_client_errors` the requests clients saw fail;
  `max_dead_gateway_errors` (only with a gateway fault) the requests in flight to the gateway when it died,
  which no gateway can answer: counted separately from the client errors; `max_gateway_down_errors` (only with
  a gateway kill or restart) the requests whose connection was refused (no gateway listening: the only one was
  restarting; on kind a second replica would answer them) and that were still unanswered at the client's
  deadline, also counted apart, never dropped; `decided_in` names
  the phase whose decision settled it (e.g. `replay`); `held_s`: the rollout waited at an approval gate at
  least this long; `received`: events the local hook receiver must have got, every request signed with
  `MLOPS_HOOK_SECRET`; `dead_attempts`: every delivery to the dead receiver made exactly this many attempts,
  each recorded, and failed.
- `traffic.warmup_s`: traffic (with its labels) sent before the rollout starts, so the prediction log holds
  recent labelled requests for a replay phase.
- `rollout`: the rollout's own spec, sent with the start request (the controller validates and stores it):
  `spec` names the bundled spec to start from (default `fast`), and every other key but these replaces that
  field of it (`phases`, `hooks`, `post_promotion_watch_s`, ...). In hook URLs `{receiver}` is a real local
  HTTP receiver the runner starts (`mlops.hook_receiver`; `receiver.answers` maps an event to the status it
  answers, default 200) and `{dead}` a URL where nothing listens. `approve_after_s`: the runner approves a
  rollout waiting at a gate after it has held this long (what `mlops rollout approve` does).

Validation reports every problem at once, each with its location.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlops.traffic import TrafficPlan
from monitoring.rollout.spec import SPECS_DIR, RolloutSpec, SpecError, load_spec
from serving.slot import Defect

REPO_SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
Outcome = Literal["promoted", "rolled_back", "rolled_back_after_promotion", "decided", "none"]
DECIDED = ("promoted", "rolled_back", "rolled_back_after_promotion")
DEFECT_FIELDS = tuple(f.name for f in fields(Defect))


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message lists each problem with its location."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_defect(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """The slot's own checks (`serving.slot.Defect`), so a scenario file and the slot never disagree."""
    if value is None:
        return None
    unknown = set(value) - set(DEFECT_FIELDS)
    if unknown:
        raise ValueError(f"unknown defect field(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFECT_FIELDS)}")
    try:
        Defect.from_dict(value)
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None
    return value


class FaultSpec(_Strict):
    """A defect switched on in the challenger's slot once the rollout reaches `when`."""

    when: Literal["shadow", "canary", "promoted_watching"]
    defect: dict[str, Any]

    _defect = field_validator("defect")(_check_defect)


class ChallengerSpec(_Strict):
    source: Literal["trained", "retrained"] = Field(
        "trained", description="trained: built here from `seed`; retrained: the drift monitor must produce it"
    )
    seed: int = Field(2, ge=0, description="seed of the trained model the challenger is built from")
    defect: dict[str, Any] | None = None
    fault: FaultSpec | None = None

    _defect = field_validator("defect")(_check_defect)


class TrafficSpec(_Strict):
    rps: float = Field(150, gt=0, le=5_000)
    label_delay_s: float = Field(2.0, ge=0, le=3_600)
    fraud_rate: float = Field(0.03, gt=0, lt=1)
    drift: str | None = None
    seed: int = 0
    duration_s: float | None = Field(None, gt=0, le=3_600, description="for `outcome: none`: how long to watch")
    warmup_s: float = Field(0.0, ge=0, le=120, description="traffic before the rollout starts (for a replay)")

    def plan(self, duration_s: float, seed_offset: int = 0) -> TrafficPlan:
        return TrafficPlan(
            self.rps, duration_s, self.label_delay_s, self.drift, self.fraud_rate, seed=self.seed + seed_offset
        )


ChaosStatus = Literal["shadow", "canary", "promoted_watching"]


ChaosTarget = Literal[
    "mlflow", "control-plane", "gateway", "champion-slot", "challenger-slot", "controller", "drift-monitor"
]


class ChaosSpec(_Strict):
    kill: ChaosTarget = Field(description="the service the fault hits")
    action: Literal["kill", "hang", "restart"] = "kill"
    for_s: float = Field(4.0, gt=0, le=120, description="hang: how long the service stays stopped")
    when: list[ChaosStatus] = Field(default_factory=lambda: ["canary"], min_length=1)

    @field_validator("when", mode="before")
    @classmethod
    def _one_status_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


RECEIVER, DEAD = "{receiver}", "{dead}"


class ReceiverSpec(_Strict):
    answers: dict[str, int] = Field(default_factory=dict, description="event -> HTTP status (default 200)")


class RolloutSection(BaseModel):
    """The rollout's own spec: `spec` (a bundled name) with the other keys replacing its fields."""

    model_config = ConfigDict(extra="allow", frozen=True)

    spec: str = "fast"
    approve_after_s: float | None = Field(None, ge=0, le=600)
    receiver: ReceiverSpec = ReceiverSpec()

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def document(self, receiver_url: str, dead_url: str) -> dict[str, Any]:
        """The whole spec as a mapping (what the start request carries), hook URLs filled in."""
        path = SPECS_DIR / f"{self.spec}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
            raise ValueError(f"rollout.spec: no bundled spec {self.spec!r} (known: {known})")
        data = {**yaml.safe_load(path.read_text()), **copy.deepcopy(self.overrides())}
        for hook in data.get("hooks") or []:
            if isinstance(hook, dict) and isinstance(hook.get("url"), str):
                hook["url"] = hook["url"].replace(RECEIVER, receiver_url).replace(DEAD, dead_url)
        return data

    def validated(self) -> RolloutSpec:
        """The spec with placeholder URLs, through the controller's own loader (raises SpecError)."""
        return load_spec(self.document("http://127.0.0.1:9", "http://127.0.0.1:9"))

    @property
    def uses_receiver(self) -> bool:
        return any(RECEIVER in str(hook.get("url", "")) for hook in self.overrides().get("hooks") or [])

    @property
    def dead_hooks(self) -> bool:
        return any(DEAD in str(hook.get("url", "")) for hook in self.overrides().get("hooks") or [])


class Expectation(_Strict):
    outcome: Outcome
    within_s: float = Field(180, gt=0, le=3_600)
    max_challenger_weight: float | None = Field(None, ge=0, le=1)
    max_client_errors: int = Field(0, ge=0)
    max_dead_gateway_errors: int = Field(0, ge=0, description="requests in flight to a gateway that died")
    max_gateway_down_errors: int = Field(
        0, ge=0, description="requests refused while no gateway listened and unanswered at the client's deadline"
    )
    reason_contains: str | list[str] | None = Field(
        None, description="a word the decision's reason must contain; a list: any one of them"
    )
    retrain: bool | None = Field(None, description="whether the drift monitor must (true) or must not submit a run")
    decided_in: str | None = Field(None, description="the phase whose decision settled the outcome")
    held_s: float | None = Field(None, ge=0, description="waited at an approval gate at least this long")
    received: list[str] = Field(default_factory=list, description="events the local receiver must have got")
    dead_attempts: int | None = Field(None, ge=1, description="attempts of every delivery to the dead receiver")


class Scenario(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    group: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]*$", description="a tag, e.g. faults")
    challenger: ChallengerSpec = ChallengerSpec()
    traffic: TrafficSpec = TrafficSpec()
    chaos: ChaosSpec | None = None
    rollout: RolloutSection | None = None
    expect: Expectation


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a mapping, got {type(data).__name__}")
    try:
        scenario = Scenario.model_validate(data)
        scenario.traffic.plan(1.0)  # the traffic's own checks (e.g. an unknown drift kind)
        if scenario.rollout is not None:
            scenario.rollout.validated()  # the controller's loader: every problem, each naming its field
    except SpecError as error:
        lines = [f"rollout.{problem}" for problem in error.problems]
        raise ScenarioError(f"invalid scenario {source}:\n" + "\n".join(f"  - {line}" for line in lines)) from None
    except ValidationError as error:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in error.errors()]
        raise ScenarioError(f"invalid scenario {source}:\n" + "\n".join(f"  - {line}" for line in lines)) from None
    except ValueError as error:
        where = "" if str(error).startswith("rollout.") else "traffic: "
        raise ScenarioError(f"invalid scenario {source}:\n  - {where}{error}") from None
    return scenario


def load_scenario(path: Path) -> Scenario:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ScenarioError(f"cannot read scenario {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ScenarioError(f"scenario {path} is not valid YAML: {error}") from None
    scenario = parse_scenario(data, str(path))
    if scenario.name != path.stem:
        raise ScenarioError(f"scenario {path}: name {scenario.name!r} must match the file name {path.stem!r}")
    return scenario


def available(directory: Path = REPO_SCENARIOS) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve(
    selector: str, directory: Path = REPO_SCENARIOS, group: str | None = None, exclude_group: str | None = None
) -> list[Scenario]:
    """`all`, a scenario name from `scenarios/`, or a path to a YAML file; with `group`, only the scenarios of
    that group (`all` then means all of the group); with `exclude_group`, all but that group's."""
    if group is not None or exclude_group is not None:
        chosen = [
            s
            for s in resolve(selector, directory)
            if (group is None or s.group == group) and (exclude_group is None or s.group != exclude_group)
        ]
        if not chosen:
            raise ScenarioError(f"no scenario of group {group!r} (excluding {exclude_group!r}) in {selector!r}")
        return chosen
    if selector == "all":
        names = available(directory)
        if not names:
            raise ScenarioError(f"no scenarios in {directory}")
        scenarios = [load_scenario(directory / f"{name}.yaml") for name in names]
        # Drift scenarios last (clean traffic before drifted): a retrained champion carries a different
        # training reference, which must not be what the other scenarios' drift monitor compares against.
        return sorted(scenarios, key=lambda s: (s.challenger.source == "retrained", s.expect.outcome != "none"))
    path = Path(selector)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return [load_scenario(path)]
    candidate = directory / f"{selector}.yaml"
    if not candidate.exists():
        raise ScenarioError(f"unknown scenario {selector!r}; known: {', '.join(available(directory))}, or all")
    return [load_scenario(candidate)]
