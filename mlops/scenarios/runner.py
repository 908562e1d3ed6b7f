"""Run scenarios against a running platform: build the challenger, send traffic, start a rollout through the
controller's API, inject the scenario's fault, wait for the decision, judge it.

The runner talks to the platform the way a user does: HTTP to the gateway, the controller and the control
plane, MLflow for registration. Only two things depend on where the platform runs, and they sit behind
`Target`: bringing it up, and killing a process for the chaos scenarios (`LocalTarget` here; the kind target
deletes pods). The decision logic is the controller's, untouched: scenarios only compress time (the `fast`
rollout spec) and raise the request rate.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from control_plane.client import ControlPlaneClient
from control_plane.labels_token import resolve_labels_token
from control_plane.rollouts_client import ControllerUnavailable, RolloutsClient
from control_plane.tokens import resolve_token
from core.processes import free_port
from core.settings import Settings
from mlops.hook_receiver import HookReceiver
from mlops.scenarios import models
from mlops.scenarios.judge import Observed, ScenarioResult, consistency_failures, judge, outcome_of
from mlops.scenarios.spec import Scenario
from mlops.traffic import BackgroundTraffic

TERMINAL = ("succeeded", "rolled_back", "aborted")
POLL_S = 0.25
GRACE_S = 60.0  # beyond a scenario's time bound, how long to wait for any decision before giving up
SETTLE_S = 30.0  # after a fault scenario, how long the platform may take to agree with the outcome


def stack_service(target: str, plan: dict[str, Any]) -> str:
    """The stack's process name for a scenario's chaos target (the slots by their role in this rollout)."""
    if target == "champion-slot":
        return f"slot-{plan['champion_slot']}"
    if target == "challenger-slot":
        return f"slot-{plan['challenger_slot']}"
    return target


class Target(Protocol):
    """Where the platform runs."""

    def ensure_up(self, on_progress: Callable[[str], None]) -> None: ...
    def kill(self, service: str) -> None: ...  # "controller", "slot-a", "slot-b": SIGKILL or pod deletion
    def hang(self, service: str) -> None: ...  # SIGSTOP of every process of the service
    def resume(self, service: str) -> None: ...  # SIGCONT: the end of a hang
    def restart(self, service: str) -> None: ...  # a graceful stop, after which it is started again
    def wait_healthy(self, timeout: float) -> None: ...
    def release(self, on_progress: Callable[[str], None]) -> None: ...  # stop what ensure_up started


@dataclass
class LocalTarget:
    """The local stack of `mlops up` (started here when it is not running, and then stopped at the end)."""

    settings: Settings
    keep: bool = False
    started: bool = False

    def ensure_up(self, on_progress: Callable[[str], None]) -> None:
        from mlops.local_stack import stack_status, stack_up

        rows = {row["name"]: row for row in stack_status(self.settings)}
        if rows["supervisor"]["alive"]:  # a stack is up; a service restarting is the supervisor's business
            on_progress("using the running local stack")
            return
        on_progress("starting the local stack (mlops up)")
        stack_up(self.settings, on_progress=lambda line: on_progress(f"  {line}"))
        self.started = True

    def kill(self, service: str) -> None:
        from core.processes import kill_tree
        from mlops.local_stack import read_state

        entry = read_state(self.settings).get(service)
        if entry is None:
            raise RuntimeError(f"{service} is not part of the running local stack")
        kill_tree(entry["pid"], entry.get("mark", ""))

    def _members(self, service: str) -> list[Any]:
        from core.processes import group_members
        from mlops.local_stack import read_state

        entry = read_state(self.settings).get(service)
        if entry is None:
            raise RuntimeError(f"{service} is not part of the running local stack")
        return group_members(entry["pid"], entry.get("mark", ""))

    def hang(self, service: str) -> None:
        """SIGSTOP the whole group (workers in sessions of their own too, found by the mark): all of it stops,
        as a process stalled on a dead disk does; the supervisor sees it alive and does nothing."""
        import signal

        for process in self._members(service):
            with contextlib.suppress(Exception):
                process.send_signal(signal.SIGSTOP)

    def resume(self, service: str) -> None:
        import signal

        for process in self._members(service):
            with contextlib.suppress(Exception):
                process.send_signal(signal.SIGCONT)

    def restart(self, service: str) -> None:
        """SIGTERM the group and wait for it to end (a rolling restart's old pod); the supervisor starts a new one."""
        from core.processes import stop_pid
        from mlops.local_stack import read_state

        entry = read_state(self.settings).get(service)
        if entry is None:
            raise RuntimeError(f"{service} is not part of the running local stack")
        stop_pid(entry["pid"], timeout=20.0, mark=entry.get("mark", ""))

    def wait_healthy(self, timeout: float) -> None:
        from mlops.local_stack import stack_status

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = stack_status(self.settings)
            if all(row["healthy"] for row in rows):
                return
            time.sleep(0.5)
        down = [row["name"] for row in stack_status(self.settings) if not row["healthy"]]
        raise RuntimeError(f"local stack not healthy after {timeout:.0f}s: {', '.join(down)} down")

    def release(self, on_progress: Callable[[str], None]) -> None:
        from mlops.local_stack import stack_down

        if self.started and not self.keep:
            on_progress("stopping the local stack this run started (keep it with --keep-stack)")
            stack_down(self.settings, on_progress=lambda line: on_progress(f"  {line}"))


@dataclass
class KindTarget:
    """The platform on the kind cluster (`make up`): never started or stopped here; a kill deletes the
    service's pod at once (`--grace-period=0 --force`), what a node failure or an OOM kill looks like, and its
    Deployment brings a new one."""

    settings: Settings

    def _kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = ["kubectl", "--context", self.settings.kube_context, "-n", self.settings.namespace, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def ensure_up(self, on_progress: Callable[[str], None]) -> None:
        for name, url in (("controller", self.settings.controller_url), ("gateway", self.settings.gateway_base_url)):
            try:
                httpx.get(f"{url}/healthz", timeout=5.0).raise_for_status()
            except httpx.HTTPError as error:
                raise RuntimeError(
                    f"{name} unreachable at {url} ({error}): run `make up`, then `make scenario`"
                ) from None
        on_progress(f"using the platform on kind (context {self.settings.kube_context}, ns {self.settings.namespace})")

    def kill(self, service: str) -> None:
        selector = f"app.kubernetes.io/name={service}"
        result = self._kubectl("delete", "pod", "-l", selector, "--grace-period=0", "--force", "--wait=false")
        if result.returncode != 0:
            raise RuntimeError(f"could not delete the {service} pod: {result.stderr.strip()}")

    def _signal(self, service: str, signal_name: str) -> None:
        # The service is PID 1 of its container (the image's entrypoint execs it): stop or continue it there.
        deployment = f"deployment/{service}"
        result = self._kubectl("exec", deployment, "--", "kill", f"-{signal_name}", "1")
        if result.returncode != 0:
            raise RuntimeError(f"could not send SIG{signal_name} to {service}: {result.stderr.strip()}")

    def hang(self, service: str) -> None:
        self._signal(service, "STOP")

    def resume(self, service: str) -> None:
        self._signal(service, "CONT")

    def restart(self, service: str) -> None:
        result = self._kubectl("rollout", "restart", f"deployment/{service}")
        if result.returncode != 0:
            raise RuntimeError(f"could not restart {service}: {result.stderr.strip()}")

    def wait_healthy(self, timeout: float) -> None:
        result = self._kubectl("wait", "--for=condition=Available", "deployment", "--all", f"--timeout={timeout:.0f}s")
        if result.returncode != 0:
            raise RuntimeError(f"platform not healthy after {timeout:.0f}s: {result.stderr.strip()}")

    def release(self, on_progress: Callable[[str], None]) -> None:
        """The cluster stays up: `make down` removes it."""


@dataclass
class Progress:
    """What the live display shows while one scenario runs."""

    scenario: str
    stage: str = "preparing"
    rollout_status: str = "-"
    phase: str = "-"
    elapsed_s: float = 0.0
    traffic: dict[str, Any] = field(default_factory=dict)


class ScenarioRunner:
    def __init__(
        self,
        settings: Settings,
        target: Target,
        on_progress: Callable[[str], None] = print,
        on_status: Callable[[Progress], None] | None = None,
    ) -> None:
        self.settings, self.target = settings, target
        self.say, self.show = on_progress, on_status or (lambda _: None)
        self.token = resolve_token(settings)
        self.control = ControlPlaneClient(settings.control_plane_url, token=self.token)
        self.http = httpx.Client(timeout=30.0)
        self.controller = RolloutsClient(settings.controller_url, token=self.token, timeout=30.0)
        self._hangs: list[threading.Timer] = []

    # --- the platform's APIs ---------------------------------------------------------------------

    def _slot_version(self, slot: str) -> str | None:
        try:
            return self.http.get(f"{self.settings.slot_urls[slot]}/v1/status", timeout=2.0).json().get("model_version")
        except (httpx.HTTPError, ValueError):
            return None

    def _set_fault(self, slot: str, defect: dict[str, Any]) -> None:
        url = f"{self.settings.slot_urls[slot]}/v1/fault"
        response = self.http.post(url, json=defect, headers={"Authorization": f"Bearer {self.token}"})
        response.raise_for_status()

    # --- preparing the stage ---------------------------------------------------------------------

    def prepare(self) -> None:
        """Stack up, no rollout in flight, the champion registered and live on its slot with all traffic."""
        self.target.ensure_up(self.say)
        self.target.wait_healthy(180)
        active = self.controller.active()
        if active is not None:
            rollout_id = active["rollout_id"]
            self.say(f"aborting rollout {rollout_id} left over from an earlier run")
            self.controller.abort(rollout_id, "scenario runner: stale rollout")
        champion = models.ensure_champion(self.settings, self.say)
        policy = self.control.get_policy()
        slot = policy.champion_slot
        other = "b" if slot == "a" else "a"
        if self._slot_version(slot) != champion:
            self.say(f"loading champion v{champion} into slot {slot}")
            self.control.assign(slot, champion)
            self._wait_for(lambda: self._slot_version(slot) == champion, 120, f"slot {slot} to load v{champion}")
        if policy.weights.get(other, 0.0) > 0 or policy.shadow:
            self.control.set_policy({slot: 1.0, other: 0.0}, False, slot, "scenario runner: all traffic to champion")
        for name in ("a", "b"):  # a fault switched on by an earlier scenario must not leak into this one
            if self._slot_version(name) is not None:
                self._set_fault(name, {})

    def _wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")

    # --- one scenario ------------------------------------------------------------------------------

    def run(self, scenario: Scenario, index: int = 0) -> ScenarioResult:
        progress = Progress(scenario.name)
        self.show(progress)
        self.prepare()
        if scenario.challenger.source == "retrained":
            return self._run_drift(scenario, index, progress)
        challenger = scenario.challenger
        progress.stage = "building the challenger"
        self.show(progress)
        version = models.register(self.settings, challenger.seed, scenario.name, challenger.defect, self.say)
        self.say(f"{scenario.name}: challenger v{version} (seed {challenger.seed}, defect {challenger.defect})")
        budget = scenario.expect.within_s + GRACE_S
        rollout = scenario.rollout
        dead_url = f"http://127.0.0.1:{free_port()}/gone"  # nothing listens there
        receiver = None
        if rollout is not None and rollout.uses_receiver:
            answers = rollout.receiver.answers
            receiver = HookReceiver(self.settings.hook_secret, lambda _path, event, _n: answers.get(event or "", 200))
        traffic = BackgroundTraffic(
            self.settings.gateway_base_url,
            scenario.traffic.plan(budget + scenario.traffic.warmup_s + 120, seed_offset=index),
            labels_token=resolve_labels_token(self.settings),
        ).start()
        deliveries: list[dict[str, Any]] = []
        try:
            with receiver or contextlib.nullcontext():
                spec = None if rollout is None else rollout.document(receiver.url("") if receiver else "", dead_url)
                self._warm_up(scenario, traffic, progress)
                view = self.controller.start(version, spec=spec)
                status, decisions = self._follow(scenario, view, traffic, progress, budget)
                if spec is not None and spec.get("hooks"):
                    deliveries = self._settled_deliveries(view["rollout_id"])
        finally:
            self._end_hangs()
            stats = traffic.stop()
        summary = stats.summary()
        received = [
            {"event": r.event, "path": r.path, "signature_ok": r.signature_ok}
            for r in (receiver.received if receiver else [])
        ]
        final = self._settled(scenario, view["plan"], status, view["rollout_id"]) if scenario.chaos else None
        observed = Observed(
            status, decisions, view["plan"]["phases"], stats.failed, summary,
            received=received, deliveries=deliveries, dead_url=dead_url, plan=view["plan"], final_state=final,
        )  # fmt: skip
        result = judge(scenario, observed)
        result.details.update(
            rollout_id=view["rollout_id"],
            challenger_version=version,
            hook_requests=len(received),
            deliveries=[{k: d[k] for k in ("hook", "event", "status", "attempts")} for d in deliveries],
        )
        return result

    def _warm_up(self, scenario: Scenario, traffic: BackgroundTraffic, progress: Progress) -> None:
        """Traffic (and its labels) before the rollout, so a replay phase finds recent labelled requests."""
        if not scenario.traffic.warmup_s:
            return
        progress.stage = f"warming up ({scenario.traffic.warmup_s:g}s of traffic before the rollout)"
        began = time.monotonic()
        while time.monotonic() - began < scenario.traffic.warmup_s:
            progress.elapsed_s = time.monotonic() - began
            progress.traffic = {"sent": traffic.stats.sent, "failed": traffic.stats.failed}
            self.show(progress)
            time.sleep(POLL_S)

    def _settled_deliveries(self, rollout_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The rollout's hook deliveries once none is still pending (the sender retries off the loop) and the
        final decision's actions have run (they queue its notifications: a terminal status is saved first)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                actions_left = self.controller.rollout(rollout_id)["pending_actions"]
                rows = self.controller.deliveries(rollout_id)
            except ControllerUnavailable:
                actions_left, rows = 1, []
            if not actions_left and rows and all(row["status"] not in ("pending", "calling") for row in rows):
                return rows
            if time.monotonic() > deadline:
                return rows
            time.sleep(0.5)

    def _follow(
        self, scenario: Scenario, view: dict[str, Any], traffic: BackgroundTraffic, progress: Progress, budget: float
    ) -> tuple[str, list[dict[str, Any]]]:
        rollout_id = view["rollout_id"]
        phases = view["plan"]["phases"]
        challenger_slot = view["plan"]["challenger_slot"]
        started = time.monotonic()
        killed_in: set[str] = set()  # the statuses whose kill is done: one kill in each of `chaos.when`
        fault_done = approved = False
        approve_after = scenario.rollout.approve_after_s if scenario.rollout else None
        progress.stage = "rolling out"
        while True:
            view = self._read(rollout_id)
            if view is None:  # the controller is down (killed, restarting): the rollout carries on without it
                if time.monotonic() - started > budget + GRACE_S:
                    raise RuntimeError(f"controller unreachable at {self.settings.controller_url} for too long")
                time.sleep(POLL_S)
                continue
            state = view["state"]
            status = state["status"]
            progress.rollout_status = status
            index = state["phase_index"]
            progress.phase = phases[index]["name"] if index < len(phases) else "watch"
            progress.elapsed_s = time.monotonic() - started
            progress.traffic = {"sent": traffic.stats.sent, "failed": traffic.stats.failed}
            self.show(progress)
            if status in TERMINAL:
                break
            if scenario.chaos and status in scenario.chaos.when and status not in killed_in:
                self._inject(scenario, view["plan"], status)
                killed_in.add(status)
            waiting_since = state.get("awaiting_approval_since")
            held = None if waiting_since is None else time.time() - waiting_since
            if approve_after is not None and not approved and held is not None and held >= approve_after:
                self.say(f"{scenario.name}: approving the rollout held at {progress.phase} for {held:.1f}s")
                self.controller.approve(rollout_id, "scenario runner: approved")  # as a person would
                approved = True
            fault = scenario.challenger.fault
            if fault and not fault_done and status == fault.when:
                self.say(f"{scenario.name}: the challenger's slot degrades now ({status}): {fault.defect}")
                self._set_fault(challenger_slot, fault.defect)
                fault_done = True
            if time.monotonic() - started > budget:
                self.say(f"{scenario.name}: no decision after {budget:.0f}s; aborting the rollout")
                self.controller.abort(rollout_id, "scenario timed out")
                break
            time.sleep(POLL_S)
        decisions = self.controller.decisions(rollout_id)
        return status, decisions

    def _inject(self, scenario: Scenario, plan: dict[str, Any], status: str) -> None:
        """The scenario's fault, now. A hang ends on a timer of its own (not on the next poll, which may wait on
        the very service that hangs)."""
        assert scenario.chaos is not None
        chaos, service = scenario.chaos, stack_service(scenario.chaos.kill, plan)
        if chaos.action == "kill":
            self.say(f"{scenario.name}: killing {service} (SIGKILL) during {status}")
            self.target.kill(service)
        elif chaos.action == "restart":
            self.say(f"{scenario.name}: restarting {service} (SIGTERM) during {status}")
            self.target.restart(service)
        else:
            self.say(f"{scenario.name}: hanging {service} (SIGSTOP) for {chaos.for_s:g}s during {status}")
            self.target.hang(service)
            timer = threading.Timer(chaos.for_s, self._resume, (scenario.name, service))
            self._hangs.append(timer)
            timer.start()

    def _resume(self, name: str, service: str) -> None:
        self.say(f"{name}: {service} continues (SIGCONT)")
        self.target.resume(service)

    def _end_hangs(self) -> None:
        """A hang never outlives its scenario: pending timers fire now."""
        for timer in self._hangs:
            if timer.is_alive():
                timer.cancel()
                timer.function(*timer.args)
        self._hangs.clear()

    def final_state(self, rollout_id: str) -> dict[str, Any]:
        """What the platform says after the scenario: traffic policy, slot assignments, MLflow aliases."""
        from mlflow import MlflowClient

        from core.aliases import CHALLENGER, CHAMPION, PREVIOUS
        from core.registry import alias_version

        policy = self.control.get_policy()
        slots = {name: a.model_version for name, a in self.control.get_assignments().items()}
        client = MlflowClient(self.settings.tracking_uri)
        aliases = {a: alias_version(client, self.settings.model_name, a) for a in (CHAMPION, CHALLENGER, PREVIOUS)}
        pending = self.controller.rollout(rollout_id).get("pending_actions", [])
        return {
            "policy": {"weights": dict(policy.weights), "shadow": policy.shadow, "champion_slot": policy.champion_slot},
            "slots": slots,
            "aliases": aliases,
            "pending_actions": len(pending) if isinstance(pending, list) else int(pending or 0),
        }

    def _settled(self, scenario: Scenario, plan: dict[str, Any], status: str, rollout_id: str) -> dict[str, Any]:
        """After a fault, wait for the stack to be healthy and the platform to agree with the outcome (a pending
        action finishes on the controller's next tick), up to SETTLE_S; then return what it says."""
        self.target.wait_healthy(120)
        deadline = time.monotonic() + SETTLE_S
        while True:
            try:
                state = self.final_state(rollout_id)
            except Exception as error:  # a service still coming back: ask again
                state = {"error": f"{type(error).__name__}: {error}"}
            outcome = outcome_of(status, self.controller.decisions(rollout_id))
            if "error" not in state and not consistency_failures(outcome, plan, state):
                return state
            if time.monotonic() > deadline:
                return state
            time.sleep(1.0)

    def _run_drift(self, scenario: Scenario, index: int, progress: Progress) -> ScenarioResult:
        """Traffic only: the drift monitor must (or must not) retrain, and the retrained model must go through
        a guarded rollout that reaches a decision."""
        expect, started = scenario.expect, time.time()
        watch_s = scenario.traffic.duration_s or expect.within_s
        budget = expect.within_s + GRACE_S
        traffic = BackgroundTraffic(
            self.settings.gateway_base_url,
            scenario.traffic.plan(budget + 120, seed_offset=index),
            labels_token=resolve_labels_token(self.settings),
        ).start()
        status, decisions, phases, retrains, rollout_id = "none", [], [], [], None
        try:
            progress.stage = "waiting for the drift monitor"
            while time.time() - started < (watch_s if expect.outcome == "none" else budget):
                retrains = [r for r in self._retrains() if r["started_at"] >= started]
                progress.elapsed_s = time.time() - started
                progress.traffic = {"sent": traffic.stats.sent, "failed": traffic.stats.failed}
                progress.rollout_status = f"{len(retrains)} retraining run(s)"
                progress.phase = retrains[-1]["status"] if retrains else "-"
                self.show(progress)
                view = self._active()
                if view is not None:
                    rollout_id = view["rollout_id"]
                    self.say(f"{scenario.name}: the retrained model is in rollout {rollout_id}")
                    status, decisions = self._follow(scenario, view, traffic, progress, budget)
                    phases = view["plan"]["phases"]
                    break
                if retrains and retrains[-1]["status"] == "failed":
                    self.say(f"{scenario.name}: the retraining run failed; see {retrains[-1]['log']}")
                    break
                time.sleep(1.0)
            retrains = [r for r in self._retrains() if r["started_at"] >= started]
        finally:
            stats = traffic.stop()
        observed = Observed(status, decisions, phases, stats.failed, stats.summary(), len(retrains), started)
        result = judge(scenario, observed)
        result.details.update(rollout_id=rollout_id, retrain_runs=retrains)
        return result

    def _retrains(self) -> list[dict[str, Any]]:
        try:
            response = self.http.get(f"{self.settings.drift_monitor_url}/v1/drift", timeout=5.0)
            return list(response.json().get("retrains", []))
        except (httpx.HTTPError, ValueError):
            return []  # the monitor restarting: ask again on the next poll

    def _read(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout's view, or None while the controller does not answer (killed, restarting)."""
        try:
            return self.controller.rollout(rollout_id)
        except ControllerUnavailable:
            return None

    def _active(self) -> dict[str, Any] | None:
        try:
            return self.controller.active()
        except ControllerUnavailable:
            return None


def run_scenarios(
    runner: ScenarioRunner, scenarios: list[Scenario], on_result: Callable[[ScenarioResult], None] | None = None
) -> list[ScenarioResult]:
    """Each scenario in turn; one that cannot run at all (e.g. the stack will not start) fails with the
    reason, and the others still run."""
    results = []
    for index, scenario in enumerate(scenarios):
        try:
            result = runner.run(scenario, index)
        except Exception as error:  # a broken run is a failed scenario with its reason, not a crash of all
            message = f"{type(error).__name__}: {error}"
            result = ScenarioResult(
                scenario.name, scenario.expect.outcome, "error", False, None, message, [message], {}
            )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
