"""`mlops`: the one entry point for users, tests and the Makefile.

Contract: commands exit 0 only on success; with `--json` the last stdout line is one JSON object.
Human progress goes to stderr, so `--json` output stays machine-readable. Heavy libraries (Ray, KFP,
MLflow) are imported inside the commands that need them, so `mlops --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from control_plane.rollouts_client import RolloutsClient
from core.settings import Settings, SettingsError, load_settings

T = TypeVar("T")

app = typer.Typer(
    help="Card-fraud MLOps platform template.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Synthetic transaction data.", no_args_is_help=True)
pipeline_app = typer.Typer(help="The training pipeline definition.", no_args_is_help=True)
policy_app = typer.Typer(help="The traffic policy (control plane).", no_args_is_help=True)
slot_app = typer.Typer(help="Model slot assignments (control plane).", no_args_is_help=True)
serve_app = typer.Typer(help="Run one serving process in the foreground.", no_args_is_help=True)
rollout_app = typer.Typer(help="Guarded rollouts (the controller's API).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(policy_app, name="policy")
app.add_typer(slot_app, name="slot")
app.add_typer(serve_app, name="serve")
app.add_typer(rollout_app, name="rollout")

err = Console(stderr=True, soft_wrap=True)  # soft wrap: messages stay greppable on narrow terminals


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        err.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


@app.command("settings")
def show_settings() -> None:
    """Show the effective settings (all come from MLOPS_* environment variables)."""
    settings = _settings()
    table = Table("setting", "env", "value")
    for name in type(settings).model_fields:
        table.add_row(name, f"MLOPS_{name.upper()}", str(getattr(settings, name)))
    table.add_row("tracking_uri (derived)", "", settings.tracking_uri)
    Console().print(table)


@data_app.command("generate")
def data_generate(
    rows: Annotated[int, typer.Option(min=0, help="number of transactions")] = 50_000,
    out: Annotated[Path, typer.Option(help="output Parquet file")] = Path("transactions.parquet"),
    seed: Annotated[int, typer.Option(help="random seed (same seed, same data)")] = 0,
    drift: Annotated[str | None, typer.Option(help="covariate | new-category | concept")] = None,
    corrupt: Annotated[
        str | None, typer.Option(help="missing-column | wrong-type | out-of-range | null-burst | label-rate | empty")
    ] = None,
) -> None:
    """Write synthetic card transactions (about 2 % fraud) to a Parquet file."""
    from components.dataset import write_transactions
    from core.synthetic import CORRUPT_KINDS, DRIFT_KINDS, generate_transactions

    if drift is not None and drift not in DRIFT_KINDS:
        raise _fail(f"--drift {drift!r}: choose one of {', '.join(DRIFT_KINDS)}")
    if corrupt is not None and corrupt not in CORRUPT_KINDS:
        raise _fail(f"--corrupt {corrupt!r}: choose one of {', '.join(CORRUPT_KINDS)}")
    frame = generate_transactions(rows, seed=seed, drift=drift, corrupt=corrupt)  # type: ignore[arg-type]
    write_transactions(frame, out)
    rate = f"{frame['is_fraud'].mean():.2%}" if "is_fraud" in frame and len(frame) else "n/a"
    err.print(f"wrote {len(frame)} rows to {out} (fraud rate {rate})")


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="where to write the KFP IR YAML")] = Path("build/training_pipeline.yaml"),
) -> None:
    """Compile the training pipeline to KFP IR YAML (what the KFP API accepts)."""
    _settings()
    from pipelines.runner import compile_pipeline

    err.print(f"compiled pipeline to {compile_pipeline(out)}")


@app.command("run")
def run(
    data: Annotated[Path | None, typer.Option(help="train on this Parquet file")] = None,
    generate: Annotated[int | None, typer.Option(min=1, help="generate this many rows instead")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="pipeline parameter KEY=VALUE (repeatable)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
    target: Annotated[str | None, typer.Option(help="local or kind (default: MLOPS_TARGET)")] = None,
) -> None:
    """Run the training pipeline (ingest, validate, drift check, train, evaluate, register, deploy)."""
    import os

    if target is not None:
        if target not in ("local", "kind"):
            raise _fail(f"--target must be local or kind, got {target!r}")
        os.environ["MLOPS_TARGET"] = target
    settings = _settings()  # first: the pipeline modules read settings when imported
    from components.dataset import DataFileError, read_transactions
    from mlops.run_view import PipelineProgress
    from pipelines.runner import STEPS, ParameterError, new_run_id, parse_params, run_local

    if data is not None and generate is not None:
        raise _fail("give --data or --generate, not both")
    try:
        params = parse_params(param or [])
    except ParameterError as error:
        raise _fail(str(error)) from None
    if data is not None:
        try:
            read_transactions(data)  # fail fast, before any pipeline machinery starts
        except DataFileError as error:
            raise _fail(str(error)) from None
        params["data_path"] = str(data.resolve())
    elif generate is not None:
        params["rows"] = generate
    else:
        params.setdefault("rows", settings.demo_rows)
    run_id = new_run_id()
    if settings.target == "kind":
        from pipelines.cluster import ClusterRunError, run_on_cluster

        try:
            result = run_on_cluster(settings, params, on_progress=err.print, run_id=run_id)
        except ClusterRunError as error:
            raise _fail(str(error), 1) from None
        _print_run(result, Path(f"KFP run {run_id} (see the KFP UI)"))
        if as_json:
            _emit_json(result.to_dict())
        raise typer.Exit(0 if result.status == "SUCCEEDED" else 1)
    log_path = settings.runs_dir / run_id / "pipeline.log"
    # The view follows the run's log from here, on the terminal: run_local sends the steps' output to the log.
    with PipelineProgress(log_path, f"pipeline run {run_id}", STEPS):
        result = run_local(settings, params, run_id=run_id, log_path=log_path)
    _print_run(result, log_path)
    if as_json:
        _emit_json(result.to_dict())
    if result.status != "SUCCEEDED":
        raise typer.Exit(1)


def _print_run(result: Any, log_path: Path) -> None:
    if result.status == "SUCCEEDED":
        err.print(
            f"[green]SUCCEEDED[/green] in {result.seconds}s: {result.model_name} v{result.model_version} "
            f"aliases={result.aliases}"
        )
        table = Table("metric", "value", title="holdout metrics")
        for name, value in result.metrics.items():
            table.add_row(name, f"{value:.4f}")
        err.print(table)
        if result.deploy:
            err.print(f"deploy: [bold]{result.deploy['action']}[/bold]: {result.deploy['reason']}")
    else:
        err.print(f"[red]FAILED[/red] at step [bold]{result.failed_step}[/bold]: {result.reason}")
        err.print(f"full log: {log_path}")


@app.command("train")
def train(
    workers: Annotated[int, typer.Option(min=1, max=16, help="Ray Train workers")] = 2,
    epochs: Annotated[int, typer.Option(min=1, max=200)] = 6,
    rows: Annotated[int, typer.Option(min=1_000, help="synthetic rows to train on")] = 50_000,
    seed: Annotated[int, typer.Option()] = 0,
    inject_worker_failure_at_epoch: Annotated[
        int | None, typer.Option(min=1, help="kill one worker during epoch K (1-based) to exercise recovery")
    ] = None,
    run_name: Annotated[
        str | None, typer.Option(help="checkpoint run name; reuse one after a driver crash to resume")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Train alone (no pipeline, no registry), for experiments and fault tests."""
    from components.dataset import write_transactions
    from components.train import TrainParams, train_model
    from core.synthetic import generate_transactions

    settings = _settings()
    settings.ensure_dirs()
    try:
        params = TrainParams(
            workers=workers,
            epochs=epochs,
            seed=seed,
            batch_size=settings.train_batch_size,
            learning_rate=settings.train_learning_rate,
            max_failures=settings.train_max_failures,
            inject_failure_at_epoch=inject_worker_failure_at_epoch,
        )
    except ValueError as error:
        raise _fail(str(error)) from None
    name = run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    data_path = settings.data_dir / f"train-{rows}-{seed}.parquet"
    if not data_path.exists():
        write_transactions(generate_transactions(rows, seed=seed), data_path)
    with err.status(f"training {name} with {workers} Ray worker(s), {epochs} epochs"):
        outcome = train_model(data_path, settings.checkpoint_root, name, params, settings.runs_dir / name / "model")
    err.print(
        f"[green]done[/green]: {outcome.epochs_completed} epochs, restarts={outcome.restarts}, "
        f"resumed_from_epoch={outcome.resumed_from_epoch}, val PR-AUC={outcome.metrics['val_pr_auc']:.4f}, "
        f"{outcome.rows_per_second:.0f} rows/s"
    )
    if as_json:
        _emit_json(
            {
                "restarts": outcome.restarts,
                "resumed_from_epoch": outcome.resumed_from_epoch,
                "epochs_completed": outcome.epochs_completed,
                "checkpoint": outcome.checkpoint,
                "metrics": outcome.metrics,
                "rows_per_second": outcome.rows_per_second,
                "wall_seconds": outcome.wall_seconds,
                "run_name": name,
            }
        )


@app.command("models")
def models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered versions of the model with their aliases and lineage."""
    from core.registry import connect

    settings = _settings()
    client = connect(settings)
    # search_model_versions leaves aliases out: read each version.
    found = client.search_model_versions(f"name = '{settings.model_name}'")
    versions = [client.get_model_version(settings.model_name, v.version) for v in found]
    rows = [
        {
            "version": v.version,
            "aliases": sorted(v.aliases),
            "run": v.tags.get("mlops.pipeline_run_id"),
            "validation": v.tags.get("mlops.validation"),
        }
        for v in sorted(versions, key=lambda v: int(v.version))
    ]
    if as_json:
        _emit_json({"model_name": settings.model_name, "versions": rows})
        return
    table = Table("version", "aliases", "pipeline run", "validation", title=settings.model_name)
    for row in rows:
        table.add_row(str(row["version"]), ", ".join(row["aliases"]), str(row["run"]), str(row["validation"]))
    Console().print(table)


def _control_plane(settings: Settings, write: bool = False) -> Any:
    from control_plane.client import ControlPlaneClient
    from control_plane.tokens import resolve_token

    return ControlPlaneClient(settings.control_plane_url, token=resolve_token(settings) if write else None)


def _control_plane_call(call: Any) -> Any:
    from control_plane.client import ControlPlaneError, ControlPlaneUnavailable

    try:
        return call()
    except ControlPlaneUnavailable as error:
        raise _fail(f"control plane unreachable: {error} (is `mlops serve control-plane` running?)", 1) from None
    except ControlPlaneError as error:
        raise _fail(f"control plane refused: {error}", 1) from None


@policy_app.command("show")
def policy_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the traffic policy in force."""
    settings = _settings()
    with _control_plane(settings) as client:
        policy = _control_plane_call(client.get_policy)
    if as_json:
        _emit_json(policy.to_json())
        return
    err.print(
        f"generation {policy.generation}: champion slot {policy.champion_slot}, weights {policy.weights}, "
        f"shadow {'on' if policy.shadow else 'off'} ({policy.reason})"
    )


@policy_app.command("set")
def policy_set(
    challenger_weight: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of traffic to the challenger")],
    champion_slot: Annotated[str, typer.Option(help="slot holding the champion: a or b")] = "a",
    shadow: Annotated[bool, typer.Option("--shadow/--no-shadow", help="mirror champion traffic")] = False,
    reason: Annotated[str, typer.Option(help="recorded with the new generation")] = "set by hand",
    expected_generation: Annotated[int | None, typer.Option(help="refuse if another write came first")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Write a new traffic policy generation (needs the control-plane token)."""
    if champion_slot not in ("a", "b"):
        raise _fail(f"--champion-slot {champion_slot!r}: must be a or b")
    settings = _settings()
    challenger = "b" if champion_slot == "a" else "a"
    weights = {champion_slot: round(1.0 - challenger_weight, 9), challenger: challenger_weight}
    with _control_plane(settings, write=True) as client:
        policy = _control_plane_call(
            lambda: client.set_policy(weights, shadow, champion_slot, reason, expected_generation)
        )
    err.print(f"policy generation {policy.generation} written")
    if as_json:
        _emit_json(policy.to_json())


@slot_app.command("assign")
def slot_assign(
    slot: Annotated[str, typer.Argument(help="a or b")],
    version: Annotated[str, typer.Argument(help="registered model version to load")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Tell a slot which model version to serve (needs the control-plane token)."""
    settings = _settings()
    if slot not in ("a", "b"):
        raise _fail(f"unknown slot {slot!r}: slots are a and b")
    _require_registered_version(settings, version)
    with _control_plane(settings, write=True) as client:
        assignment = _control_plane_call(lambda: client.assign(slot, version))
    err.print(
        f"slot {assignment.slot} assigned version {assignment.model_version} (generation {assignment.generation})"
    )
    if as_json:
        _emit_json(assignment.to_json())


def _require_registered_version(settings: Settings, version: str) -> None:
    """Refuse to assign a version the registry does not have: the slot would only fail to load it."""
    from mlflow.exceptions import MlflowException

    from core.registry import connect

    try:
        connect(settings).get_model_version(settings.model_name, version)
    except MlflowException:
        raise _fail(f"model {settings.model_name!r} has no version {version!r} in {settings.tracking_uri}") from None


@serve_app.command("control-plane")
def serve_control_plane(
    port: Annotated[int | None, typer.Option(help="default: from MLOPS_CONTROL_PLANE_URL")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """The control-plane API (traffic policy, slot assignments)."""
    from urllib.parse import urlsplit

    from control_plane.app import serve

    settings = _settings()
    settings.ensure_dirs()
    serve(settings, host, port or urlsplit(settings.control_plane_url).port or 8700)


@serve_app.command("slot")
def serve_slot(
    slot: Annotated[str, typer.Option(help="a or b")],
    port: Annotated[int | None, typer.Option(help="default: MLOPS_SLOT_A_PORT / _B_PORT")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """A model slot (BentoML service) serving the version assigned to it."""
    from serving.services import serve_service

    if slot not in ("a", "b"):
        raise _fail(f"--slot {slot!r}: must be a or b")
    settings = _settings()
    settings.ensure_dirs()
    serve_service(
        "slot", settings, host, port or (settings.slot_a_port if slot == "a" else settings.slot_b_port), slot=slot
    )


@serve_app.command("gateway")
def serve_gateway(
    port: Annotated[int | None, typer.Option(help="default: MLOPS_GATEWAY_PORT")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """The gateway (BentoML service): canary split, shadow, fallback, prediction log, feedback."""
    from serving.services import serve_service

    settings = _settings()
    settings.ensure_dirs()
    serve_service("gateway", settings, host, port or settings.gateway_port)


@app.command("up")
def up() -> None:
    """Start the local stack (MLflow, control plane, controller, two slots, gateway) in the background."""
    from core.processes import ProcessFailed
    from mlops.local_stack import StackError, stack_up

    settings = _settings()
    try:
        rows = stack_up(settings, on_progress=lambda line: err.print(f"  {line}"))
    except (StackError, ProcessFailed) as error:
        raise _fail(str(error), 1) from None
    err.print(
        f"[green]stack up[/green]: {sum(r['healthy'] for r in rows)}/{len(rows)} healthy; "
        f"logs in {settings.logs_dir}; stop with `mlops down`"
    )


@app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Each stack process: pid, alive, healthy, URL, log file."""
    from mlops.local_stack import stack_status

    rows = stack_status(_settings())
    if as_json:
        _emit_json({"services": rows, "healthy": all(r["healthy"] for r in rows)})
        return
    table = Table("service", "pid", "alive", "healthy", "restarts", "url", "log")
    for row in rows:
        table.add_row(
            row["name"],
            str(row["pid"] or "-"),
            "yes" if row["alive"] else "no",
            "[green]yes[/green]" if row["healthy"] else "[red]no[/red]",
            str(row["restarts"]),
            row["url"],
            row["log"],
        )
    Console().print(table)


@app.command("down")
def down() -> None:
    """Stop exactly the processes `mlops up` started."""
    from mlops.local_stack import stack_down

    stopped = stack_down(_settings(), on_progress=lambda line: err.print(f"  {line}"))
    err.print(f"stopped {len(stopped)} process(es)")


@serve_app.command("controller")
def serve_controller(
    port: Annotated[int | None, typer.Option(help="default: from MLOPS_CONTROLLER_URL")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """The rollout controller: its loop plus the API that `mlops rollout` and the pipeline use."""
    from urllib.parse import urlsplit

    from monitoring.rollout.process import serve
    from monitoring.rollout.spec import SpecError

    settings = _settings()
    settings.ensure_dirs()
    try:
        serve(settings, host, port or urlsplit(settings.controller_url).port or 8730)
    except SpecError as error:  # e.g. a prometheus guardrail without MLOPS_PROMETHEUS_URL: refused at start
        raise _fail(str(error)) from None


@serve_app.command("drift-monitor")
def serve_drift_monitor(
    port: Annotated[int | None, typer.Option(help="default: from MLOPS_DRIFT_MONITOR_URL")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """The drift monitor: Evidently over prediction-log windows, metrics, reports, retraining runs."""
    from urllib.parse import urlsplit

    from monitoring.drift.monitor import serve

    settings = _settings()
    serve(settings, host, port or urlsplit(settings.drift_monitor_url).port or 8740)


@serve_app.command("supervisor", hidden=True)
def serve_supervisor() -> None:
    """Restart local-stack services that die (started by `mlops up`, stopped first by `mlops down`)."""
    import logging
    import signal

    from mlops.local_stack import supervise

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())  # finish the current pass, then exit
    supervise(_settings(), stopping.is_set)


def _controller(call: Callable[[RolloutsClient], T]) -> T:
    """One call to the controller's API, its failures as one line for a person (exit 1)."""
    from control_plane.rollouts_client import ControllerError, ControllerUnavailable
    from control_plane.tokens import resolve_token

    settings = _settings()
    try:
        with RolloutsClient(settings.controller_url, token=resolve_token(settings), timeout=120) as client:
            return call(client)
    except ControllerUnavailable as error:
        raise _fail(f"{error} (is `mlops serve controller` running?)", 1) from None
    except ControllerError as error:
        raise _fail(f"controller refused ({error.status}): {error.error}", 1) from None


def _latest_rollout_id(client: RolloutsClient) -> str:
    rollouts = client.rollouts()
    if not rollouts:
        raise _fail("no rollout yet", 1)
    return rollouts[0]["rollout_id"]


@rollout_app.command("start")
def rollout_start(
    version: Annotated[str, typer.Argument(help="registered version to roll out")],
    spec: Annotated[
        Path | None, typer.Option(help="a rollout spec (YAML) for this rollout only, instead of the controller's")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start a guarded rollout of VERSION against the current champion."""
    document = None
    if spec is not None:
        import yaml

        from monitoring.rollout.spec import SpecError, load_spec

        try:
            load_spec(spec)  # refused here, naming each field, before the controller is asked
        except SpecError as error:
            raise _fail(str(error)) from None
        document = yaml.safe_load(spec.read_text())
    view = _controller(lambda client: client.start(version, spec=document))
    err.print(view["description"])
    if as_json:
        _emit_json(view)


@rollout_app.command("plan")
def rollout_plan(
    spec: Annotated[str, typer.Option("--spec", help="a bundled spec name (default, fast) or a YAML path")] = "default",
    rps: Annotated[
        float | None, typer.Option("--rps", help="requests per second (default: the spec's planning)")
    ] = None,
    fraud_rate: Annotated[float | None, typer.Option("--fraud-rate")] = None,
    label_delay: Annotated[float | None, typer.Option("--label-delay", help="seconds until a label arrives")] = None,
    design_effect: Annotated[
        float | None,
        typer.Option(
            "--design-effect",
            help="how much account clustering widens the intervals (>= 1; measure it with `mlops rollout "
            "design-effect`; default: the spec's planning, else 1)",
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="parquet or csv with the slice columns and is_fraud, for each slice's share of the "
            "payments and frauds (default: 200,000 synthetic transactions)"
        ),
    ] = None,
    reference_seed: Annotated[int, typer.Option(help="seed of the default synthetic reference")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per phase, the expected seconds to a decision for an identical challenger and for a 20 % recall drop at the
    given traffic, and whether each deadline can be met (monitoring/rollout/planner.py). Exit 1 if one cannot.
    Then per slice, whether slice-recall catches a halving of the slice's recall before a healthy shadow phase
    ends (monitoring/rollout/slice_plan.py): information only, slices never make a spec invalid."""
    from monitoring.rollout.planner import plan, plan_problems
    from monitoring.rollout.slice_plan import coverage_summary, shares_from_frame, slice_coverage
    from monitoring.rollout.spec import Planning, SliceRecallGuardrail, SpecError, format_location, spec_from_setting

    try:
        loaded = spec_from_setting(spec)
        base = loaded.planning or Planning()
        given = {"rps": rps, "fraud_rate": fraud_rate, "label_delay_s": label_delay, "design_effect": design_effect}
        planning = Planning(**{**base.model_dump(), **{k: v for k, v in given.items() if v is not None}})
        problems = plan_problems(loaded.model_copy(update={"planning": planning}))
    except (SpecError, ValueError) as error:
        raise _fail(str(error)) from None
    rows = plan(loaded, planning)
    columns = sorted({c for g in loaded.guardrails if isinstance(g, SliceRecallGuardrail) for c in g.slices})
    slices = (
        slice_coverage(loaded, planning, shares_from_frame(_reference(reference, reference_seed), columns))
        if columns
        else []
    )
    summary = coverage_summary(slices, planning.rps)
    shown = lambda value: "-" if value is None or value == float("inf") else f"{value:.0f}"  # noqa: E731
    if as_json:
        finite = lambda row: {k: v if v != float("inf") else None for k, v in row.__dict__.items()}  # noqa: E731
        _emit_json({"spec": loaded.name, "planning": planning.model_dump(),
                    "phases": [finite(row) for row in rows], "problems": [f"{format_location(loc)}: {m}"
                                                                         for loc, m in problems],
                    "slices": [finite(row) for row in slices], "slice_summary": summary})  # fmt: skip
    else:
        clustered = f", design effect {planning.design_effect:g}" if planning.design_effect != 1 else ""
        table = Table(title=f"{loaded.name} at {planning.rps:g} requests/s, {planning.fraud_rate:g} fraud, labels "
                      f"{planning.label_delay_s:g} s late{clustered}")  # fmt: skip
        for column in ("phase", "deadline s", "identical: median s", "identical: sure s", "bottleneck",
                       "20 % recall drop: median s to fail", "80 % power s",
                       "half a margin worse: 90 % pass s"):  # fmt: skip
            table.add_column(column)
        for row in rows:
            table.add_row(row.name, shown(row.deadline_s), shown(row.pass_s), shown(row.sure_pass_s), row.bottleneck,
                          shown(row.fail_s), shown(row.power_fail_s), shown(row.half_margin_pass_s))  # fmt: skip
        Console(width=150).print(table)
        if slices:
            Console(width=150).print(_slice_table(slices))
            if any(row.beyond_whole_margin for row in slices):
                Console(width=150, soft_wrap=True).print("* beyond online-recall's margin: the whole-traffic recall "
                                                         "guardrail fails or holds the shadow phase itself",
                                                         markup=False)  # fmt: skip
            for line in summary:
                Console(width=150, soft_wrap=True).print(line, markup=False)
        for loc, message in problems:
            err.print(f"{format_location(loc)}: {message}", style="red", markup=False)
    if problems:
        raise typer.Exit(1)


def _reference(path: Path | None, seed: int) -> Any:
    """The reference dataset of `rollout plan`'s slice shares: a parquet or csv file, or synthetic transactions of
    the family the training pipeline uses."""
    import pandas as pd

    if path is None:
        from core.synthetic import generate_transactions

        return generate_transactions(200_000, seed=seed)
    try:
        frame = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise _fail(f"cannot read the reference {path}: {error}") from None
    missing = [c for c in ("merchant_category", "country", "is_fraud") if c not in frame.columns]
    if missing:
        raise _fail(f"the reference {path} lacks the column(s) {', '.join(missing)}")
    return frame


def _slice_table(slices: list[Any]) -> Table:
    """`rollout plan`'s slice table: one row per slice of each slice-recall guardrail."""
    budget, names = slices[0].budget_s, list(dict.fromkeys(row.guardrail for row in slices))
    table = Table(title=f"Slices ({', '.join(names)}): a halved slice recall failed with 80 % power before a healthy "
                  f"shadow phase ends ({budget:.0f} s)? frauds/s: the slice's labelled frauds per second; frauds "
                  "needed: to fail its recall halved with 80 % power; whole drop: the halving's cut in the "
                  "whole-traffic recall")  # fmt: skip
    if len(names) > 1:
        table.add_column("guardrail", no_wrap=True)
    table.add_column("slice", no_wrap=True)
    for column in ("% payments", "% frauds", "recall", "frauds/s", "frauds needed", "time",
                   "covered", "rps needed", "whole drop"):  # fmt: skip
        table.add_column(column)
    never = float("inf")
    for row in slices:
        cells = [row.guardrail] if len(names) > 1 else []
        cells += [row.slice, f"{row.payments:.1%}", f"{row.frauds:.1%}", f"{row.recall:g}", f"{row.frauds_per_s:.3f}",
                  "never" if row.frauds_needed == never else f"{row.frauds_needed:,.0f}",
                  "never" if row.seconds == never else f"{row.seconds:,.0f} s", "yes" if row.covered else "no",
                  "never" if row.rps_needed == never else f"{row.rps_needed:,.0f}",
                  f"{row.whole_drop:.1%}" + (" *" if row.beyond_whole_margin else "")]  # fmt: skip
        table.add_row(*cells)
    return table


@rollout_app.command("design-effect")
def rollout_design_effect(
    window_s: Annotated[
        float, typer.Option("--window-s", min=1.0, help="seconds of the prediction log to measure, ending now")
    ] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """How clustered your traffic is, per signal (monitoring/rollout/clustering.py): the design effect to give the
    power planner (`planning.design_effect`, `mlops rollout plan --design-effect`). Measure over a window as long
    as your longest phase deadline: the design effect grows with the window."""
    import math
    import time

    from core.prediction_log import read_feedback, read_window, served_times
    from monitoring.rollout.clustering import measure_design_effects, planning_design_effect

    settings = _settings()
    log_dir = settings.prediction_log_dir
    predictions = read_window(log_dir / "predictions", since=time.time() - window_s)
    if predictions.empty:
        raise _fail(f"no requests in the last {window_s:g} s of the prediction log ({log_dir / 'predictions'})")
    feedback = read_feedback(log_dir / "feedback", predictions["request_id"], served_times(predictions))
    effects = measure_design_effects(predictions, feedback, settings.decision_threshold)
    if not effects:
        raise _fail(f"none of the {len(predictions):,} requests of the last {window_s:g} s was answered by a model "
                    "(degraded, forced or failed): nothing to measure")  # fmt: skip
    suggested = planning_design_effect(effects)
    if as_json:
        signals = [{**e.__dict__, "design_effect": e.design_effect if math.isfinite(e.design_effect) else None}
                   for e in effects]  # fmt: skip
        _emit_json({"window_s": window_s, "signals": signals, "design_effect": suggested})
        return
    table = Table(title=f"Design effect by account over the last {window_s:g} s")
    for column in ("signal", "rows", "accounts", "busiest account", "design effect"):
        table.add_column(column)
    for e in effects:
        table.add_row(e.signal, f"{e.rows:,}", f"{e.accounts:,}", f"{e.busiest_account_rows:,}",
                      f"{e.design_effect:.2f}" if math.isfinite(e.design_effect) else "-")  # fmt: skip
    Console(width=150).print(table)
    err.print(f"plan with: mlops rollout plan --design-effect {suggested:.2f} (or planning.design_effect in the spec)")


@rollout_app.command("status")
def rollout_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The active rollout, or the most recent one."""
    view = _controller(lambda client: client.rollout(_latest_rollout_id(client)))
    err.print(view["description"])
    if as_json:
        _emit_json(view)


@rollout_app.command("history")
def rollout_history(
    rollout_id: Annotated[str | None, typer.Argument()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    analyses: Annotated[bool, typer.Option("--analyses", help="every analysis too, not only decisions")] = False,
) -> None:
    """Every decision of a rollout (default: the latest) with the metric values behind it."""
    if rollout_id is None:
        rollout_id = _controller(_latest_rollout_id)
    decisions = _controller(lambda client: client.decisions(rollout_id))
    recorded = _controller(lambda client: client.analyses(rollout_id)) if analyses else None
    if as_json:
        payload: dict[str, Any] = {"rollout_id": rollout_id, "decisions": decisions}
        if recorded is not None:
            payload["analyses"] = recorded
        _emit_json(payload)
        return
    table = Table("seq", "from", "to", "reason", title=rollout_id)
    for decision in decisions:
        table.add_row(str(decision["seq"]), decision["from_status"], decision["to_status"], decision["reason"])
    Console().print(table)
    if recorded is not None:
        runs = Table("seq", "t", "phase", "verdict", "samples", "guardrails", "transition", title="analyses")
        for row in recorded:
            verdicts = ", ".join(f"{name}={verdict}" for name, verdict in sorted(row["verdicts"].items()))
            when = time.strftime("%H:%M:%S", time.localtime(row["at"]))
            runs.add_row(
                str(row["seq"]), when, str(row["phase_index"]), row["verdict"], str(row["samples"]),
                verdicts or "-", "yes" if row["transition"] else "",
            )  # fmt: skip
        Console().print(runs)


def _manual(kind: str, reason: str) -> None:
    active = [r for r in _controller(lambda client: client.rollouts()) if r["active"]]
    if not active:
        raise _fail("no active rollout", 1)
    rollout_id = active[0]["rollout_id"]
    action = {
        "promote": RolloutsClient.promote,
        "abort": RolloutsClient.abort,
        "pause": RolloutsClient.pause,
        "resume": RolloutsClient.resume,
        "approve": RolloutsClient.approve,
    }[kind]
    view = _controller(lambda client: action(client, rollout_id, reason))
    err.print(view["description"])


@rollout_app.command("pause")
def rollout_pause(reason: Annotated[str, typer.Option()] = "paused by hand") -> None:
    """Hold the active rollout in its phase: analyses go on (a failing guardrail still rolls back)."""
    _manual("pause", reason)


@rollout_app.command("resume")
def rollout_resume(reason: Annotated[str, typer.Option()] = "resumed by hand") -> None:
    """Let a paused rollout advance again."""
    _manual("resume", reason)


@rollout_app.command("approve")
def rollout_approve(reason: Annotated[str, typer.Option()] = "approved by hand") -> None:
    """Open the gate of a phase waiting for approval (exit 1 and the controller's 409 if it is not waiting)."""
    _manual("approve", reason)


@rollout_app.command("watch")
def rollout_watch(
    rollout_id: Annotated[str | None, typer.Argument(help="default: the active rollout")] = None,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 0.5,
    wait: Annotated[float, typer.Option(help="seconds to wait for a rollout to become active")] = 60.0,
) -> None:
    """A live view of the rollout until its decision: exit 0 when promoted, 1 when rolled back or aborted, 2
    when no rollout becomes active within --wait seconds."""
    from control_plane.tokens import resolve_token
    from mlops.watch import watch

    settings = _settings()
    with RolloutsClient(settings.controller_url, token=resolve_token(settings), timeout=10) as client:
        code = watch(client, Console(), interval_s=interval, rollout_id=rollout_id, wait_for_start_s=wait)
    raise typer.Exit(code)


@rollout_app.command("promote")
def rollout_promote(reason: Annotated[str, typer.Option()] = "promoted by hand") -> None:
    """Promote the active rollout's challenger now (recorded as manual)."""
    _manual("promote", reason)


@rollout_app.command("abort")
def rollout_abort(reason: Annotated[str, typer.Option()] = "aborted by hand") -> None:
    """Abort the active rollout: traffic back to the champion at once, challenger rejected."""
    _manual("abort", reason)


@app.command("traffic")
def traffic(
    rps: Annotated[float, typer.Option(help="requests per second (open loop)")] = 50.0,
    duration: Annotated[float, typer.Option(help="seconds of traffic")] = 30.0,
    label_delay: Annotated[float, typer.Option(help="seconds before each label is posted")] = 5.0,
    drift: Annotated[str | None, typer.Option(help="covariate, new-category or concept")] = None,
    fraud_rate: Annotated[float, typer.Option()] = 0.02,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Send generated transactions through the gateway and post their labels later, with a live display."""
    import asyncio

    from control_plane.labels_token import resolve_labels_token
    from mlops.traffic import TrafficPlan, run_traffic

    settings = _settings()
    try:
        plan = TrafficPlan(rps, duration, label_delay, drift, fraud_rate, seed)
    except ValueError as error:
        raise _fail(str(error)) from None
    url = settings.gateway_base_url
    from rich.live import Live

    # Drawn at once: the first transactions take a few seconds to generate, before any progress report.
    with Live(_traffic_view(None, 0.0, plan, url), console=err, refresh_per_second=4, transient=False) as live:

        def show(stats: Any, elapsed: float) -> None:
            live.update(_traffic_view(stats, elapsed, plan, url))

        stats = asyncio.run(run_traffic(url, plan, on_progress=show, labels_token=resolve_labels_token(settings)))
    summary = stats.summary()
    if stats.sent and stats.failed == stats.sent:
        raise _fail(f"every request failed (is the gateway up at {url}?): {summary['errors'][:1]}", 1)
    if as_json:
        _emit_json(summary)


def traffic_phase(stats: Any, elapsed: float, plan: Any) -> str:
    """What the simulator is doing now, in a person's words."""
    if stats is None:
        return "starting: generating transactions"
    if stats.sent < int(plan.rps * plan.duration_s) and elapsed <= plan.duration_s + 1:
        return "sending"
    return f"posting the last labels ({plan.label_delay_s:g}s after their requests)"


def _traffic_view(stats: Any, elapsed: float, plan: Any, url: str) -> Any:
    from rich.progress_bar import ProgressBar

    from mlops.run_view import format_seconds

    table = Table.grid(padding=(0, 2))
    table.add_row(
        f"[bold]traffic[/bold] → {url}",
        ProgressBar(total=plan.duration_s, completed=min(elapsed, plan.duration_s), width=30),
        f"{elapsed:5.1f}/{plan.duration_s:g}s",
    )
    table.add_row(f"[cyan]{traffic_phase(stats, elapsed, plan)}[/cyan]", f"elapsed {format_seconds(elapsed)}", "")
    if stats is not None:
        variants = ", ".join(f"{k} {v}" for k, v in sorted(stats.by_variant.items())) or "-"
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(stats.by_status.items())) or "-"
        table.add_row(f"sent {stats.sent}  answered {stats.answered}  failed {stats.failed}", variants, statuses)
        table.add_row(f"labels posted {stats.labels_sent} (frauds {stats.frauds_labelled})", f"drift: {plan.drift}", "")
    return table


@app.command("demo")
def demo(
    rows: Annotated[int, typer.Option(min=2_000, max=1_000_000, help="rows per training run")] = 20_000,
    keep_stack: Annotated[bool, typer.Option(help="leave a stack this command started running")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The whole life cycle: stack up, champion, challenger rollout under traffic, a rollback, one report."""
    from mlops.demo import demo_environment, demo_problems, run_demo

    demo_environment()
    settings = _settings()
    settings.ensure_dirs()
    with err.status("starting") as spinner:

        def say(line: str) -> None:
            err.print(line)

        @contextlib.contextmanager
        def pipeline_owns_the_terminal() -> Iterator[None]:
            spinner.stop()  # `mlops run` draws its own live view on this terminal meanwhile
            try:
                yield
            finally:
                spinner.start()

        record = run_demo(
            settings, rows, keep_stack, say, lambda text: spinner.update(text[:150]), pipeline_owns_the_terminal
        )
    table = Table("step", "what happened", "outcome", "seconds", title=f"demo: {record['duration_s']} s")
    for row in record["summary"]:
        table.add_row(row["step"], row["what"], row["outcome"], str(row["seconds"]))
    err.print(table)
    err.print(
        f"report: [bold]{record['report']}[/bold]" + (f"  picture: {record['picture']}" if record["picture"] else "")
    )
    problems = demo_problems(record)
    for problem in problems:
        err.print(f"[red]not shown[/red]: {problem}")
    if as_json:
        _emit_json({**{k: record[k] for k in ("summary", "report", "picture", "duration_s")}, "problems": problems})
    if problems:
        raise typer.Exit(1)


@app.command("scenario")
def scenario(
    selector: Annotated[str, typer.Argument(help="a scenario name from scenarios/, a YAML file, or all")],
    spec: Annotated[str, typer.Option(help="rollout spec for a stack this command starts")] = "fast",
    keep_stack: Annotated[bool, typer.Option(help="leave a stack this command started running")] = False,
    target: Annotated[str, typer.Option(help="local (the embedded stack) or kind (`make up`)")] = "local",
    group: Annotated[str | None, typer.Option(help="only the scenarios of this group, e.g. faults")] = None,
    exclude_group: Annotated[str | None, typer.Option(help="all but the scenarios of this group")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run rollback scenarios against the running stack (starting it if needed); exit 1 if any outcome differs."""
    import logging
    import os

    from mlops.scenarios.spec import ScenarioError, resolve

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.ERROR)

    try:
        scenarios = resolve(selector, group=group, exclude_group=exclude_group)
    except ScenarioError as error:
        raise _fail(str(error)) from None
    # For a stack started here (its processes inherit these): the rollout and the drift monitor compressed to
    # seconds, as the scenarios' time bounds assume. A running stack keeps its own settings.
    for name, value in {
        "MLOPS_ROLLOUT_SPEC": spec,
        "MLOPS_DRIFT_INTERVAL_S": "10",
        "MLOPS_DRIFT_WINDOW_S": "30",
        "MLOPS_DRIFT_MIN_ROWS": "1000",
        "MLOPS_RETRAIN_WINDOW_S": "90",
        "MLOPS_RETRAIN_COOLDOWN_S": "900",
        "MLOPS_RETRAIN_EPOCHS": "3",
        "MLOPS_TRAIN_WORKERS": "1",
        # The hook scenarios' receiver checks every body's signature with the controller's key.
        "MLOPS_HOOK_SECRET": "scenario-hook-secret",
    }.items():
        os.environ.setdefault(name, value)
    settings = _settings()
    settings.ensure_dirs()
    from mlops.scenarios.runner import KindTarget, LocalTarget, ScenarioRunner, run_scenarios

    if target not in ("local", "kind"):
        raise _fail(f"--target must be local or kind, got {target!r}")
    where = KindTarget(settings) if target == "kind" else LocalTarget(settings, keep=keep_stack)
    results = []
    from rich.live import Live

    with Live(console=err, refresh_per_second=4, transient=True) as live:

        def say(line: str) -> None:
            live.console.print(line)

        runner = ScenarioRunner(settings, where, on_progress=say, on_status=lambda p: live.update(_scenario_view(p)))
        try:
            results = run_scenarios(runner, scenarios, on_result=lambda r: say(_result_line(r)))
        finally:
            where.release(say)
    table = Table("scenario", "expected", "outcome", "decided in", "passed", "reason", title="scenarios")
    for result in results:
        seconds = f"{result.decision_seconds:.1f}s" if result.decision_seconds is not None else "-"
        verdict = "[green]yes[/green]" if result.passed else "[red]NO[/red]"
        table.add_row(result.name, result.expected, result.outcome, seconds, verdict, result.reason[:160])
    err.print(table)
    passed = all(result.passed for result in results)
    if as_json:
        _emit_json({"scenarios": [r.to_summary() for r in results], "passed": passed})
    if not passed:
        raise typer.Exit(1)


def _result_line(result: Any) -> str:
    mark = "[green]passed[/green]" if result.passed else f"[red]FAILED[/red] ({'; '.join(result.failures)})"
    return f"{result.name}: {result.outcome} — {mark}; {result.reason[:200]}"


def _scenario_view(progress: Any) -> Any:
    traffic = progress.traffic
    return (
        f"[bold]{progress.scenario}[/bold]: {progress.stage}; rollout {progress.rollout_status} ({progress.phase}) "
        f"{progress.elapsed_s:5.1f}s; requests sent {traffic.get('sent', 0)}, failed {traffic.get('failed', 0)}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
