"""`make demo` / `mlops demo`: the whole life cycle on the embedded default, in one command.

1. bring up the local stack (MLflow, control plane, controller, two slots, gateway, drift monitor, supervisor);
2. train and register the first champion with the training pipeline (its deploy step puts it on a slot);
3. start simulated traffic with delayed labels;
4. train a challenger with the same pipeline: its deploy step starts a guarded rollout, which runs under the
   traffic to a decision (shadow → canary steps → promotion, unless a guardrail fails);
5. show a rollback: the `latency-regression` scenario (a slower challenger, rolled back on p99 latency);
6. print a summary table and write one HTML report (and a PNG of the rollout timelines);
7. stop what it started (unless `--keep-stack`).

The rollout uses the `fast` spec and the drift monitor checks every few seconds (retraining is off during the
demo: the drift scenarios show it), so the whole demo takes a few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import httpx

from control_plane.rollouts_client import RolloutsClient
from core.settings import Settings

DEMO_ENV = {
    "MLOPS_ROLLOUT_SPEC": "fast",
    "MLOPS_DRIFT_INTERVAL_S": "10",
    "MLOPS_DRIFT_WINDOW_S": "30",
    "MLOPS_DRIFT_MIN_ROWS": "1000",
    "MLOPS_RETRAIN_ENABLED": "false",
}


def demo_environment() -> None:
    """Defaults for a stack the demo starts (its processes inherit them); explicit settings win."""
    for name, value in DEMO_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def run_pipeline(
    settings: Settings, data: Path, label: str, params: dict[str, Any], say: Callable[[str], None]
) -> dict:
    """`mlops run --data ... --json` as a user runs it (its live step display goes to the terminal)."""
    from core.processes import mlops_command

    args = ["run", "--data", str(data), "--json"]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    say(f"[bold]{label}[/bold]: mlops {' '.join(args)}")
    started = time.time()
    process = subprocess.run(mlops_command(*args), stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    lines = [line for line in process.stdout.strip().splitlines() if line.strip()]
    result = json.loads(lines[-1]) if lines else {"status": "FAILED", "reason": "no output"}
    result["label"], result["wall_seconds"] = label, round(time.time() - started, 1)
    result["history"] = training_history(settings, result.get("model_version"))
    result["steps"] = step_summaries(settings, result.get("run_id"))
    steps_dir = settings.runs_dir / str(result.get("run_id")) / "steps"
    pages = {"Data Docs (validation)": "validate.html", "Evidently drift report": "drift_check.html"}
    result["pages"] = {name: str(steps_dir / file) for name, file in pages.items() if (steps_dir / file).exists()}
    return result


def training_history(settings: Settings, version: str | None) -> list[dict[str, float]]:
    """Per-epoch curves of the version's training run, from MLflow."""
    if version is None:
        return []
    from core.registry import connect

    client = connect(settings)
    run_id = client.get_model_version(settings.model_name, version).run_id
    by_epoch: dict[int, dict[str, float]] = {}
    for key in ("train_loss", "val_log_loss", "val_pr_auc"):
        for metric in client.get_metric_history(run_id, key):
            by_epoch.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    return [by_epoch[e] for e in sorted(by_epoch)]


def step_summaries(settings: Settings, run_id: str | None) -> dict[str, Any]:
    """What the steps recorded under `runs/<run_id>/steps/` (validation and drift results)."""
    if run_id is None:
        return {}
    directory = settings.runs_dir / run_id / "steps"
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))} if directory.exists() else {}


def follow_rollout(settings: Settings, rollout_id: str, timeout_s: float, on_status: Callable[[str], None]) -> dict:
    """Wait for the rollout's terminal status; return its view and decisions."""
    deadline = time.monotonic() + timeout_s
    with RolloutsClient(settings.controller_url, timeout=10.0) as controller:
        while True:
            view = controller.rollout(rollout_id)
            on_status(view["description"])
            if view["state"]["status"] in ("succeeded", "rolled_back", "aborted") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        decisions = controller.decisions(rollout_id)
    return {"view": view, "decisions": decisions}


def rollout_entry(label: str, story: str, followed: dict, timeline: list[dict], traffic: dict) -> dict[str, Any]:
    from mlops.scenarios.judge import deciding, decision_seconds, outcome_of
    from mlops.timeline import with_decisions

    view, decisions = followed["view"], followed["decisions"]
    outcome = outcome_of(view["state"]["status"], decisions)
    decision = deciding(decisions, outcome)
    return {
        "label": label,
        "story": story,
        "rollout_id": view["rollout_id"],
        "outcome": outcome,
        "reason": decision["reason"] if decision else view["description"],
        "decision_seconds": decision_seconds(decisions, outcome),
        "decisions": decisions,
        "plan": view["plan"],
        "timeline": with_decisions(timeline, decisions),
        "traffic": traffic,
    }


def run_demo(
    settings: Settings,
    rows: int,
    keep_stack: bool,
    say: Callable[[str], None],
    status: Callable[[str], None],
    own_terminal: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> dict[str, Any]:
    """The whole demo; returns the record the report is rendered from (also written as `record.json`).
    `own_terminal()` is held while a pipeline run draws its own live view (the caller's spinner stops)."""
    from components.dataset import write_transactions
    from control_plane.labels_token import resolve_labels_token
    from core.synthetic import generate_transactions
    from mlops.local_stack import stack_down, stack_status, stack_up
    from mlops.report import render_png, render_report
    from mlops.scenarios.models import cache_from_version
    from mlops.scenarios.runner import LocalTarget, ScenarioRunner
    from mlops.scenarios.spec import resolve
    from mlops.timeline import TimelineRecorder
    from mlops.traffic import BackgroundTraffic, TrafficPlan

    started = time.time()
    record: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))}
    record.update(home=str(settings.home), runs=[], rollouts=[], summary=[])
    summary = record["summary"]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    out_dir = settings.reports_dir / f"demo-{stamp}"

    def step(name: str, what: str, outcome: str, since: float) -> None:
        summary.append({"step": name, "what": what, "outcome": outcome, "seconds": round(time.time() - since, 1)})
        say(f"[bold]{name}[/bold]: {outcome} ({summary[-1]['seconds']} s)")

    already_up = all(row["healthy"] for row in stack_status(settings))
    since = time.time()
    if not already_up:
        say("starting the local stack (mlops up)")
        stack_up(settings, on_progress=lambda line: say(f"  {line}"))
    step("stack", "MLflow, control plane, controller, slots a/b, gateway, drift monitor", "up", since)
    os.environ["MLOPS_MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{settings.mlflow_port}"  # for the pipeline runs
    registry = Settings(mlflow_tracking_uri=os.environ["MLOPS_MLFLOW_TRACKING_URI"], home=settings.home)
    timeline = TimelineRecorder(settings.controller_url).start()
    traffic: BackgroundTraffic | None = None
    try:
        # 2. the first champion
        data_dir = settings.data_dir
        champion_data, challenger_data = data_dir / f"demo-{stamp}-1.parquet", data_dir / f"demo-{stamp}-2.parquet"
        write_transactions(generate_transactions(rows, seed=1), champion_data)
        # The challenger is retrained on twice as much (newer) data: an equal-or-better model, as a retrain should be.
        write_transactions(generate_transactions(2 * rows, seed=2, start="2026-02-01"), challenger_data)
        since = time.time()
        with own_terminal():
            first = run_pipeline(registry, champion_data, "first champion", {"epochs": 4}, say)
        record["runs"].append(first)
        step("train champion", f"pipeline on {rows} rows", f"{first['status']} v{first.get('model_version')}", since)
        if first["status"] != "SUCCEEDED":
            raise RuntimeError(f"the first training run failed at {first.get('failed_step')}: {first.get('reason')}")
        _wait_for_slot(settings, str(first["model_version"]))

        # 3-4. a challenger whose deploy step starts a guarded rollout, which runs under traffic (started as the
        # pipeline ends: the rollout's first phase waits for its samples, and training keeps both cores)
        since = time.time()
        with own_terminal():
            second = run_pipeline(registry, challenger_data, "challenger", {"epochs": 4}, say)
        traffic = BackgroundTraffic(
            settings.gateway_base_url, TrafficPlan(150, 3_600, 2.0, seed=7), labels_token=resolve_labels_token(settings)
        ).start()
        record["runs"].append(second)
        step(
            "train challenger",
            f"pipeline on {2 * rows} newer rows",
            f"{second['status']} v{second.get('model_version')}",
            since,
        )
        deploy = second.get("deploy") or {}
        if deploy.get("action") == "rollout_started":
            since = time.time()
            followed = follow_rollout(settings, deploy["rollout_id"], 300, status)
            entry = rollout_entry(
                "guarded rollout of the retrained model",
                "The challenger the pipeline just registered goes shadow → 10 % → 50 % → 100 % under live traffic "
                "with delayed labels, judged by the guardrails at each step, then a post-promotion watch.",
                followed,
                timeline.for_rollout(deploy["rollout_id"]),
                traffic.stats.summary(),
            )
            record["rollouts"].append(entry)
            step("rollout", f"v{second['model_version']} against the champion", entry["outcome"], since)
        else:
            step("rollout", "the deploy step's request", f"not started: {deploy.get('reason')}", time.time())

        # 5. a rollback
        traffic.stop()
        traffic = None
        since = time.time()
        scenario = resolve("latency-regression")[0]
        if second.get("model_version"):  # wrap the model just trained rather than train another
            cache_from_version(registry, scenario.challenger.seed, str(second["model_version"]))
        runner = ScenarioRunner(registry, LocalTarget(settings), on_progress=say)
        result = runner.run(scenario)
        rollout_id = result.details.get("rollout_id")
        if rollout_id:
            followed = follow_rollout(settings, rollout_id, 30, lambda _: None)
            entry = rollout_entry(
                "rollback scenario: latency-regression",
                scenario.description.strip(),
                followed,
                timeline.for_rollout(rollout_id),
                result.details.get("traffic", {}),
            )
            record["rollouts"].append(entry)
        record["scenario"] = result.to_summary()
        step("rollback scenario", "a challenger 150 ms slower", f"{result.outcome} (passed: {result.passed})", since)
    except Exception as error:  # the report is still written, and the command says what broke and exits 1
        record["error"] = f"{type(error).__name__}: {error}"
        say(f"[red]the demo stopped early[/red]: {record['error']}")
    finally:
        if traffic is not None:
            traffic.stop()
        timeline.stop()
        record["duration_s"] = round(time.time() - started, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "record.json").write_text(json.dumps(record, indent=2, default=str))
        record["report"] = str(render_report(record, out_dir / "report.html"))
        png = render_png(record, out_dir / "rollouts.png")
        record["picture"] = str(png) if png else None
        if not already_up and not keep_stack:
            say("stopping the local stack the demo started (keep it with --keep-stack)")
            stack_down(settings, on_progress=lambda line: say(f"  {line}"))
    return record


def demo_problems(record: dict[str, Any]) -> list[str]:
    """What the demo failed to show, one line each; empty when it showed the whole life cycle.

    A guardrail may roll back the retrained model (a legitimate, recorded decision), so any decided outcome
    counts for that rollout; an undecided one, a failed pipeline run or a rollback scenario that did not roll
    back do not."""
    problems = [f"stopped early: {record['error']}"] if record.get("error") else []
    for run in record.get("runs", []):
        if run.get("status") != "SUCCEEDED":
            problems.append(f"{run.get('label')}: pipeline {run.get('status')} at {run.get('failed_step')}: "
                            f"{run.get('reason')}")  # fmt: skip
    retrained = [r for r in record.get("rollouts", []) if not r["label"].startswith("rollback scenario")]
    if not retrained:
        problems.append("the retrained model's guarded rollout did not run")
    for rollout in retrained:
        if rollout["outcome"].startswith("undecided"):
            problems.append(f"{rollout['label']}: {rollout['outcome']}, no decision in time")
    scenario = record.get("scenario")
    if scenario is None:
        problems.append("the rollback scenario did not run")
    elif not scenario["passed"]:
        problems.append(f"rollback scenario {scenario['name']}: {'; '.join(scenario['failures'])}")
    return problems


def _wait_for_slot(settings: Settings, version: str, timeout: float = 120) -> None:
    """The first champion's deploy step assigned it to a slot; wait until that slot serves it."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            policy = http.get(f"{settings.control_plane_url}/v1/policy").json()
            slot_url = settings.slot_urls[policy["champion_slot"]]
            try:
                if http.get(f"{slot_url}/v1/status").json().get("model_version") == version:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"no slot serves the champion v{version} after {timeout:.0f}s")
