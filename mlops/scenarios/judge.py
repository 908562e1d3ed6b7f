"""Pure functions that turn a finished rollout (its state, plan and decisions, as the controller's API returns
them) and what the clients saw into a scenario verdict. No I/O: the runner feeds them, the tests call them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mlops.scenarios.spec import DECIDED, Scenario

PROMOTED = "promoted_watching"
ROLLED_BACK = ("rolled_back", "aborted")


@dataclass(frozen=True)
class Observed:
    """What one scenario run produced."""

    status: str  # the rollout's final status ("succeeded", "rolled_back", ... or a non-terminal one on timeout)
    decisions: list[dict[str, Any]]
    phases: list[dict[str, Any]]  # the plan's phases: name, kind, weight
    client_errors: int
    traffic: dict[str, Any] = field(default_factory=dict)
    retrains: int = 0  # retraining runs the drift monitor submitted during the scenario
    started_at: float | None = None  # the scenario's start, when it is not the rollout's (drift scenarios)
    received: list[dict[str, Any]] = field(default_factory=list)  # the local hook receiver's requests
    deliveries: list[dict[str, Any]] = field(default_factory=list)  # the controller's record of hook deliveries
    dead_url: str | None = None  # where nothing listens (`{dead}` in the scenario's hooks)
    plan: dict[str, Any] | None = None  # the rollout's plan: versions and slots
    # After a fault scenario: traffic policy, slot assignments, MLflow aliases, pending actions (`final_state`).
    final_state: dict[str, Any] | None = None


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    expected: str
    outcome: str
    passed: bool
    decision_seconds: float | None
    reason: str
    failures: list[str]
    details: dict[str, Any]

    def to_summary(self) -> dict[str, Any]:
        """The fields `mlops scenario --json` promises, plus why it failed."""
        keys = ("name", "expected", "outcome", "passed", "decision_seconds", "reason", "failures")
        summary = {k: v for k, v in asdict(self).items() if k in keys}
        traffic = self.details.get("traffic") or {}
        # What the clients saw: requests sent and failed, of which lost in flight with a dead gateway.
        summary["requests"] = traffic.get("sent")
        summary["client_errors"] = self.details.get("client_errors")
        summary["dead_gateway_errors"] = self.details.get("dead_gateway_errors")
        summary["gateway_down_errors"] = self.details.get("gateway_down_errors")
        return summary


def is_promotion(decision: dict[str, Any]) -> bool:
    """Entering the watch; a failed analysis during the watch is recorded as promoted_watching -> same, too."""
    return decision["to_status"] == PROMOTED and decision["from_status"] != PROMOTED


def outcome_of(status: str, decisions: list[dict[str, Any]]) -> str:
    """promoted | rolled_back | rolled_back_after_promotion | aborted | the status itself when undecided."""
    promoted = any(is_promotion(d) for d in decisions)
    if status == "succeeded":
        return "promoted"
    if status in ROLLED_BACK:
        kind = "rolled_back" if status == "rolled_back" else "aborted"
        return f"{kind}_after_promotion" if promoted else kind
    return f"undecided ({status})"


def deciding(decisions: list[dict[str, Any]], outcome: str) -> dict[str, Any] | None:
    """The decision that settled the outcome: the promotion, or the roll-back."""
    if outcome == "promoted":
        return next((d for d in decisions if is_promotion(d)), None)
    return next((d for d in decisions if d["to_status"] in ROLLED_BACK), None)


def decision_seconds(decisions: list[dict[str, Any]], outcome: str, start: float | None = None) -> float | None:
    """Seconds from the start (default: the rollout's first decision) to the deciding one."""
    decision = deciding(decisions, outcome)
    if decision is None or not decisions:
        return None
    return round(decision["at"] - (decisions[0]["at"] if start is None else start), 2)


def max_challenger_weight(decisions: list[dict[str, Any]], phases: list[dict[str, Any]]) -> float:
    """The largest share of live traffic the challenger was given (1.0 once promoted; shadow gives none)."""
    weight = 0.0
    for decision in decisions:
        if is_promotion(decision):
            weight = 1.0
        elif decision["to_status"] == "canary" and 0 <= decision["phase_index"] < len(phases):
            weight = max(weight, float(phases[decision["phase_index"]].get("weight") or 0.0))
    return weight


def consistency_failures(outcome: str, plan: dict[str, Any], final: dict[str, Any]) -> list[str]:
    """Whether the platform agrees with the rollout's outcome: the traffic policy sends everything to one slot
    with no shadow, that slot is assigned the winning version, MLflow's `champion` alias names it, no
    `challenger` alias is left, and no action is still pending. Promoted: the challenger won; rolled back
    (before or after promotion) or aborted: the champion it started from."""
    if "error" in final:
        return [f"the platform could not be read after the fault: {final['error']}"]
    if outcome == "promoted":
        version, slot = plan["challenger_version"], plan["challenger_slot"]
    elif outcome.startswith(("rolled_back", "aborted")):
        version, slot = plan["champion_version"], plan["champion_slot"]
    else:
        return []  # undecided: the outcome check already failed it
    policy, problems = final["policy"], []
    if policy["champion_slot"] != slot:
        problems.append(f"traffic policy's champion slot is {policy['champion_slot']}, expected {slot} ({outcome})")
    other = {name: weight for name, weight in policy["weights"].items() if name != slot and weight > 0}
    if other or policy["shadow"]:
        problems.append(f"traffic policy still sends {other or 'shadow'} away from slot {slot}")
    if final["slots"].get(slot) != version:
        problems.append(f"slot {slot} is assigned version {final['slots'].get(slot)}, expected {version}")
    aliases = final["aliases"]
    if aliases.get("champion") != version:
        problems.append(f"MLflow alias champion is {aliases.get('champion')}, expected {version} ({outcome})")
    if aliases.get("challenger") is not None:
        problems.append(f"MLflow alias challenger is still set (version {aliases['challenger']})")
    if final.get("pending_actions"):
        problems.append(f"{final['pending_actions']} action(s) of the rollout still pending")
    return problems


def gateway_fault(scenario: Scenario) -> bool:
    """The scenario kills or restarts the gateway (a hang keeps its socket: nothing is refused or lost)."""
    chaos = scenario.chaos
    return chaos is not None and chaos.kill == "gateway" and chaos.action != "hang"


def gateway_down_errors(scenario: Scenario, observed: Observed) -> int:
    """Requests refused by a gateway that was not listening (the only one was restarting) and unanswered at the
    client's deadline: counted apart, bounded by `max_gateway_down_errors`. With any other fault (and with none)
    they are client errors like the rest."""
    return int(observed.traffic.get("gateway_down", 0)) if gateway_fault(scenario) else 0


def dead_gateway_errors(scenario: Scenario, observed: Observed) -> int:
    """Requests in flight to a gateway that died (its own fault, killed or restarted): counted apart, bounded
    by `max_dead_gateway_errors`. With any other fault they are client errors like the rest."""
    chaos = scenario.chaos
    if chaos is None or chaos.kill != "gateway" or chaos.action == "hang":
        return 0
    return int(observed.traffic.get("in_flight_lost", 0))


def phase_name(decision: dict[str, Any], phases: list[dict[str, Any]]) -> str:
    index = decision["phase_index"]
    return str(phases[index]["name"]) if 0 <= index < len(phases) else "watch"


def hook_failures(scenario: Scenario, observed: Observed, decision: dict[str, Any] | None) -> list[str]:
    """The expectations on where the decision was taken, the approval gate and the hooks."""
    expect, failures = scenario.expect, []
    if expect.decided_in is not None:
        where = phase_name(decision, observed.phases) if decision else "nowhere"
        if where != expect.decided_in:
            failures.append(f"decided in phase {where}, expected in {expect.decided_in}")
    if expect.held_s is not None:
        approved = next((d for d in observed.decisions if d.get("metrics", {}).get("approved")), None)
        waited = approved["metrics"].get("waited_s", 0.0) if approved else None
        if waited is None or waited < expect.held_s:
            failures.append(f"held at the approval gate for {waited}s, expected at least {expect.held_s:g}s")
    events = [r.get("event") for r in observed.received]
    missing = [event for event in expect.received if event not in events]
    if missing:
        failures.append(f"the hook receiver never got {', '.join(missing)} (got {', '.join(map(str, events))})")
    unsigned = [r.get("event") for r in observed.received if not r.get("signature_ok")]
    if unsigned:
        failures.append(f"{len(unsigned)} hook request(s) without a valid signature: {', '.join(map(str, unsigned))}")
    if expect.dead_attempts is not None:
        dead = [d for d in observed.deliveries if observed.dead_url and d["url"] == observed.dead_url]
        if not dead:
            failures.append("no delivery to the dead receiver was recorded")
        for delivery in dead:
            attempts, log = delivery["attempts"], delivery.get("attempt_log", [])
            if delivery["status"] != "failed" or attempts != expect.dead_attempts or len(log) != attempts:
                failures.append(
                    f"delivery of {delivery['event']} to the dead receiver: status {delivery['status']}, "
                    f"{attempts} attempt(s), {len(log)} recorded; expected failed after {expect.dead_attempts}"
                )
            elif not all(attempt.get("error") for attempt in log):
                failures.append(f"delivery of {delivery['event']}: an attempt is recorded without its error")
    return failures


def judge(scenario: Scenario, observed: Observed) -> ScenarioResult:
    expect = scenario.expect
    outcome = outcome_of(observed.status, observed.decisions)
    seconds = decision_seconds(observed.decisions, outcome, observed.started_at)
    decision = deciding(observed.decisions, outcome)
    reason = decision["reason"] if decision else f"no decision; last status {observed.status}"
    weight = max_challenger_weight(observed.decisions, observed.phases)
    if not observed.decisions and observed.status == "none":
        outcome, reason = "none", "no rollout started"
    failures = []
    matches = outcome in DECIDED if expect.outcome == "decided" else outcome == expect.outcome
    if not matches:
        failures.append(f"outcome {outcome}, expected {expect.outcome}")
    if expect.retrain is not None and (observed.retrains > 0) != expect.retrain:
        wanted = "some" if expect.retrain else "none"
        failures.append(f"{observed.retrains} retraining run(s) submitted, expected {wanted}")
    if seconds is not None and seconds > expect.within_s:
        failures.append(f"decided after {seconds:.1f}s, expected within {expect.within_s:g}s")
    if expect.max_challenger_weight is not None and weight > expect.max_challenger_weight:
        failures.append(
            f"challenger got {weight:.0%} of live traffic, at most {expect.max_challenger_weight:.0%} allowed"
        )
    lost = dead_gateway_errors(scenario, observed)
    down = gateway_down_errors(scenario, observed)
    client_errors = observed.client_errors - lost - down
    if client_errors > expect.max_client_errors:
        first = "; ".join(observed.traffic.get("errors", [])[:3])
        failures.append(
            f"{client_errors} client request(s) failed, at most {expect.max_client_errors} allowed"
            + (f"; first: {first}" if first else "")
        )
    if lost > expect.max_dead_gateway_errors:
        failures.append(
            f"{lost} request(s) in flight lost with the gateway, at most {expect.max_dead_gateway_errors} allowed"
        )
    if down > expect.max_gateway_down_errors:
        failures.append(
            f"{down} request(s) refused by a gateway not listening and unanswered at the deadline, at most "
            f"{expect.max_gateway_down_errors} allowed"
        )
    if observed.final_state is not None and observed.plan is not None:
        failures += consistency_failures(outcome, observed.plan, observed.final_state)
    if expect.reason_contains and not any(word.lower() in reason.lower() for word in _words(expect.reason_contains)):
        wanted = " or ".join(repr(word) for word in _words(expect.reason_contains))
        failures.append(f"decision reason does not mention {wanted}: {reason}")
    failures += hook_failures(scenario, observed, decision)
    promotions = sum(is_promotion(d) for d in observed.decisions)
    rollbacks = sum(d["to_status"] in ROLLED_BACK for d in observed.decisions)
    if promotions > 1 or rollbacks > 1:
        failures.append(f"decided more than once: {promotions} promotion(s), {rollbacks} roll-back(s)")
    details = {
        "max_challenger_weight": weight,
        "promotions": promotions,
        "rollbacks": rollbacks,
        "final_status": observed.status,
        "traffic": observed.traffic,
        "retrains": observed.retrains,
        "client_errors": client_errors,
        "dead_gateway_errors": lost,
        "gateway_down_errors": down,
        "final_state": observed.final_state,
    }
    return ScenarioResult(scenario.name, expect.outcome, outcome, not failures, seconds, reason, failures, details)


def _words(reason_contains: str | list[str]) -> list[str]:
    """`expect.reason_contains` is one word or a list of alternatives (guardrails that may fail first)."""
    return [reason_contains] if isinstance(reason_contains, str) else list(reason_contains)
