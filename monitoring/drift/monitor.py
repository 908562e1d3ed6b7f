"""Drift monitor: Evidently over sliding windows of the prediction log against the champion's training
reference; metrics, an HTML report per window, and a debounced retraining run when drift crosses the line.

Every `drift_interval_s` the monitor reads the last `drift_window_s` of the prediction log (the features of
every request, and the champion's scores), compares them with the reference the champion was trained on
(logged with every model version), writes `MLOPS_HOME/reports/drift/<time>.html` plus a JSON summary, and
exports per-feature drift scores and the drift share as Prometheus metrics. When the share of drifted
features reaches `drift_share_threshold` it submits the training pipeline on recent labelled traffic plus
the reference (so the new model knows both worlds); the pipeline's deploy step then hands the result to the
rollout controller, which brings it to traffic only if it proves itself. At most one retraining run is in
flight, and none starts within `retrain_cooldown_s` of the previous one; each is recorded with the report
that triggered it (`MLOPS_HOME/drift/retrains.jsonl`).

The decisions are small pure functions (`retrain_decision`, `retraining_frame`); `DriftMonitor` is the thin
loop around them and the outside world (files, MLflow, a subprocess).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.prediction_log import read_feedback, read_window
from core.schema import CATEGORICAL_FEATURES, COLUMNS, FEATURES, LABEL, NUMERIC_FEATURES
from core.settings import Settings

log = logging.getLogger("mlops.drift")
HTML_EVERY_S = 300.0  # an Evidently HTML report is a few MB: one per window only when it drifted, else this often
KEEP_REPORTS = 50  # HTML reports kept under reports/drift (oldest deleted first)


@dataclass
class DriftCheck:
    """One window's result."""

    at: float
    status: str  # "checked", "too_few_rows", "no_champion"
    rows: int
    champion_version: str | None = None
    drift_share: float | None = None
    drifted: bool = False
    drifted_columns: list[str] = field(default_factory=list)
    column_scores: dict[str, float] = field(default_factory=dict)
    report_html: str | None = None
    retrain: dict[str, Any] | None = None  # the retraining run this check submitted, if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetrainState:
    in_flight: dict[str, Any] | None = None  # the running retraining run
    last_started_at: float | None = None
    submitted: int = 0


def retrain_decision(
    check: DriftCheck, state: RetrainState, now: float, cooldown_s: float, enabled: bool
) -> str | None:
    """Why a retraining run starts now (a sentence), or None. Debounced: never two at once, never within the
    cooldown of the last one."""
    if not enabled or check.status != "checked" or not check.drifted:
        return None
    if state.in_flight is not None:
        return None
    if state.last_started_at is not None and now - state.last_started_at < cooldown_s:
        return None
    columns = ", ".join(check.drifted_columns)
    return f"drift share {check.drift_share:.2f} over {check.rows} requests (drifted: {columns})"


def retraining_frame(predictions: pd.DataFrame, feedback: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Labelled recent requests in the data contract's columns, plus the champion's reference rows."""
    labels = feedback.drop_duplicates("request_id", keep="last").set_index("request_id")["label"]
    recent = predictions.drop_duplicates("request_id")
    recent = recent[recent["request_id"].isin(labels.index)]
    recent = recent.assign(
        transaction_id="req_" + recent["request_id"].astype(str),
        event_time=pd.to_datetime(recent["ts"], unit="s", utc=True),
        **{LABEL: recent["request_id"].map(labels).astype(int)},
    )
    names = [c.name for c in COLUMNS]
    frame = pd.concat([recent[names], reference[names]], ignore_index=True)  # (the reference's `score` is dropped)
    for column in COLUMNS:  # the prediction log stores every numeric feature as float
        if column.dtype == "int" and column.name in frame:
            frame[column.name] = frame[column.name].round().astype("int64")
    return frame


class DriftMonitor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = RetrainState()
        self.last: DriftCheck | None = None
        self.history_path = settings.home / "drift" / "retrains.jsonl"
        self._reference: tuple[str, pd.DataFrame] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._last_html_at = 0.0

    # --- the outside world ---------------------------------------------------------------------------

    def champion_reference(self) -> tuple[str, pd.DataFrame] | None:
        from core.registry import CHAMPION, alias_version, connect, download_model

        version = alias_version(connect(self.settings), self.settings.model_name, CHAMPION)
        if version is None:
            return None
        if self._reference is None or self._reference[0] != version:
            from core.model import FraudScorer

            with tempfile.TemporaryDirectory(prefix="drift-reference-") as workdir:
                model_dir, path = download_model(f"models:/{self.settings.model_name}/{version}", workdir)
                reference = pd.read_parquet(path)
                # The champion's scores on its own training data: the baseline its live scores drift from.
                scores = FraudScorer.load(model_dir).score_records(reference[list(FEATURES)].to_dict("records"))
                self._reference = (version, reference.assign(score=scores))
        return self._reference

    def check(self, now: float | None = None) -> DriftCheck:
        """One window: compare, report, maybe retrain."""
        from core.drift import drift_report

        now = time.time() if now is None else now
        self._poll_retrain(now)
        log_dir = self.settings.prediction_log_dir
        window = read_window(log_dir / "predictions", now - self.settings.drift_window_s, now)
        check = DriftCheck(at=now, status="too_few_rows", rows=len(window))
        if len(window) >= self.settings.drift_min_rows:
            champion = self.champion_reference()
            if champion is None:
                check.status = "no_champion"
            else:
                version, reference = champion
                # Requests the champion answered: their features are the traffic's, their scores the champion's.
                current = window[(window["variant"] == "champion") & (window["status"] == "ok")]
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
                html = self.settings.reports_dir / "drift" / f"drift-{stamp}.html"
                html.parent.mkdir(parents=True, exist_ok=True)
                summary = drift_report(
                    reference,
                    current,
                    None,
                    NUMERIC_FEATURES,
                    CATEGORICAL_FEATURES,
                    extra_numeric=("score",),
                    drift_share_threshold=self.settings.drift_share_threshold,
                )
                check.status, check.champion_version = "checked", version
                check.drift_share, check.drifted = summary.drift_share, summary.dataset_drift
                check.drifted_columns, check.column_scores = summary.drifted_columns, summary.column_scores
                if summary.dataset_drift or now - self._last_html_at >= HTML_EVERY_S:
                    # Same data, same tests: re-run with the HTML written (cheaper than keeping every report).
                    check.report_html = drift_report(
                        reference, current, html, NUMERIC_FEATURES, CATEGORICAL_FEATURES, extra_numeric=("score",),
                        drift_share_threshold=self.settings.drift_share_threshold,
                    ).report_html  # fmt: skip
                    self._last_html_at = now
                    _prune(html.parent, KEEP_REPORTS)
                html.with_suffix(".json").write_text(json.dumps(check.to_dict(), indent=2, default=str))
                _prune(html.parent, KEEP_REPORTS * 20, "*.json")
        reason = retrain_decision(
            check, self.state, now, self.settings.retrain_cooldown_s, self.settings.retrain_enabled
        )
        if reason is not None:
            check.retrain = self._submit_retrain(now, reason, check)
        self.last = check
        return check

    def _submit_retrain(self, now: float, reason: str, check: DriftCheck) -> dict[str, Any]:
        from core.processes import mlops_command

        settings = self.settings
        log_dir = settings.prediction_log_dir
        predictions = read_window(log_dir / "predictions", now - settings.retrain_window_s, now)
        feedback = read_feedback(log_dir / "feedback", predictions["request_id"])
        assert self._reference is not None  # set by the check that decided to retrain
        frame = retraining_frame(predictions, feedback, self._reference[1])
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        data = settings.home / "drift" / f"retrain-{stamp}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(data, index=False)
        run_log = settings.logs_dir / f"retrain-{stamp}.out"
        command = mlops_command("run", "--data", str(data), "--param", f"epochs={settings.retrain_epochs}", "--json")
        with open(run_log, "wb") as out:
            self._process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        entry = {
            "started_at": now,
            "reason": reason,
            "report": check.report_html,
            "data": str(data),
            "rows": len(frame),
            "labelled_recent_rows": len(frame) - len(self._reference[1]),
            "log": str(run_log),
            "pid": self._process.pid,
            "status": "running",
        }
        self.state.in_flight, self.state.last_started_at = entry, now
        self.state.submitted += 1
        self._record(entry)
        log.warning("drift: retraining submitted (pid %s): %s", self._process.pid, reason)
        return entry

    def _poll_retrain(self, now: float) -> None:
        if self._process is None or self._process.poll() is None or self.state.in_flight is None:
            return
        entry = self.state.in_flight
        entry["status"] = "succeeded" if self._process.returncode == 0 else "failed"
        entry["finished_at"] = now
        lines = Path(entry["log"]).read_text(errors="replace").strip().splitlines()
        try:
            entry["result"] = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            entry["result"] = {"tail": lines[-5:]}
        self._record(entry)
        self.state.in_flight, self._process = None, None

    def _record(self, entry: dict[str, Any]) -> None:
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    def stop(self) -> None:
        """A retraining run outlives the monitor only if it is already registering; stop it otherwise."""
        if self._process is not None and self._process.poll() is None:
            from core.processes import stop_pid

            stop_pid(self._process.pid, process=self._process)


def _prune(directory: Path, keep: int, pattern: str = "*.html") -> None:
    for old in sorted(directory.glob(pattern))[:-keep]:
        old.unlink(missing_ok=True)


def read_retrains(settings: Settings) -> list[dict[str, Any]]:
    """The latest record of each retraining run, oldest first."""
    path = settings.home / "drift" / "retrains.jsonl"
    if not path.exists():
        return []
    latest: dict[float, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            latest[entry["started_at"]] = entry
    return [latest[key] for key in sorted(latest)]


def drift_metrics(monitor: DriftMonitor) -> bytes:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    share = Gauge("mlops_drift_share", "Share of drifted features in the latest window", registry=registry)
    detected = Gauge("mlops_drift_detected", "1 when the latest window drifted", registry=registry)
    rows = Gauge("mlops_drift_window_rows", "Requests in the latest window", registry=registry)
    score = Gauge("mlops_drift_feature_score", "Drift test statistic per feature", ["feature"], registry=registry)
    drifted = Gauge("mlops_drift_feature_drifted", "1 when the feature drifted", ["feature"], registry=registry)
    submitted = Gauge("mlops_retrain_submitted_total", "Retraining runs submitted", registry=registry)
    in_flight = Gauge("mlops_retrain_in_flight", "1 while a retraining run runs", registry=registry)
    submitted.set(monitor.state.submitted)
    in_flight.set(monitor.state.in_flight is not None)
    check = monitor.last
    if check is not None:
        rows.set(check.rows)
        if check.status == "checked":
            share.set(check.drift_share or 0.0)
            detected.set(check.drifted)
            for feature, value in check.column_scores.items():
                score.labels(feature).set(value)
                drifted.labels(feature).set(feature in check.drifted_columns)
    return generate_latest(registry)


def serve(settings: Settings, host: str, port: int) -> None:
    """`mlops serve drift-monitor`: the loop in a thread, and /healthz, /metrics, /v1/drift."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    settings.ensure_dirs()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    monitor = DriftMonitor(settings)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.drift_interval_s):
            try:
                check = monitor.check()
                log.info("drift check: %s rows, status %s, share %s", check.rows, check.status, check.drift_share)
            except Exception:  # MLflow down, a half-written file: the next window tries again
                log.exception("drift check failed")

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def metrics(_: Request) -> Response:
        return Response(drift_metrics(monitor), media_type="text/plain; version=0.0.4")

    async def latest(_: Request) -> JSONResponse:
        return JSONResponse(
            {
                "last_check": monitor.last.to_dict() if monitor.last else None,
                "retrain_in_flight": monitor.state.in_flight,
                "retrains": read_retrains(settings),
            }
        )

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", healthz),
            Route("/metrics", metrics),
            Route("/v1/drift", latest),
        ]
    )
    thread = threading.Thread(target=loop, name="drift-loop", daemon=True)
    thread.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        stop.set()
        monitor.stop()


if __name__ == "__main__":  # pragma: no cover - `mlops serve drift-monitor` is the entry point
    serve(Settings(), "127.0.0.1", 8740)
    sys.exit(0)
