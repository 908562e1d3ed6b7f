"""Helpers shared by tests and benchmarks: small registered models without running Ray, prediction logs, rollout
plans and specs, Ray Train checkpoints.

Light to import: what needs torch or MLflow is imported inside the helper that uses it, so a test that only
writes a prediction log does not pay for them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from core.prediction_log import FEEDBACK_SCHEMA, PREDICTION_SCHEMA, BatchedParquetLog
from core.processes import free_port, start_process, stop_process, wait_until_ready
from core.settings import Settings
from monitoring.rollout.state_machine import PhaseSpec, RolloutPlan

T = TypeVar("T")


def register_model(
    settings: Settings,
    workdir: Path,
    seed: int = 0,
    defect: dict[str, float] | None = None,
    unloadable: bool = False,
) -> str:
    """Register an untrained-but-valid fraud model (fitted preprocessing, base-rate output) and return
    its version. Serving cost is identical to a trained one; `defect` bakes in a slot fault; `unloadable`
    registers a version whose weights file is garbage, so a slot fails to load it."""
    from core.model import STATE_FILE, FraudScorer, NetworkConfig, Preprocessor, build_network
    from core.registry import log_training_run, register_version
    from core.synthetic import generate_transactions

    frame = generate_transactions(2_000, seed=seed)
    preprocessor = Preprocessor.fit(frame)
    config = NetworkConfig()
    model_dir = FraudScorer(preprocessor, build_network(preprocessor, config), config).save(workdir / f"m{seed}")
    if defect:
        (model_dir / "defect.json").write_text(json.dumps(defect))
    if unloadable:
        (model_dir / STATE_FILE).write_bytes(b"not a torch state dict")
    reference = workdir / f"ref{seed}.parquet"
    frame.to_parquet(reference)
    logged = log_training_run(settings, model_dir, reference, {"seed": seed}, [], {"mlops.run_name": f"quick-{seed}"})
    version, _ = register_version(settings, logged.model_uri, logged.run_id, {"mlops.pipeline_run_id": f"quick-{seed}"})
    return version


def write_canary_log(
    log_dir: Path,
    times: np.ndarray,
    challenger_error_rate: float = 0.0,
    seed: int = 0,
    labels_at: float | None = None,
) -> None:
    """Canary rows at `times` in the gateway's own Parquet format, 50/50 champion/challenger, the same score
    distribution, each labelled: all at `labels_at`, or (None) half a second after its request. A challenger
    request that errors (`challenger_error_rate`) is answered by the champion, as the gateway's fallback does."""
    rng = np.random.default_rng(seed)
    predictions = BatchedParquetLog(log_dir / "predictions", schema=PREDICTION_SCHEMA)
    feedback = BatchedParquetLog(log_dir / "feedback", schema=FEEDBACK_SCHEMA)
    for i, ts in enumerate(times):
        challenger = i % 2 == 1
        failed = challenger and rng.random() < challenger_error_rate
        score = float(rng.beta(1, 30))
        predictions.append(
            {
                "request_id": f"r{i}",
                "ts": float(ts),
                "account_id": f"acc{i}",
                "variant": "champion" if failed or not challenger else "challenger",
                "slot": "b" if challenger else "a",
                "model_version": "2" if challenger and not failed else "1",
                "score": score,
                "latency_ms": float(rng.gamma(4, 0.5)),
                "status": "fallback" if failed else "ok",
                "policy_generation": 3,
            }
        )
        received_at = float(ts) + 0.5 if labels_at is None else labels_at
        feedback.append({"request_id": f"r{i}", "label": int(rng.random() < score), "received_at": received_at})
    predictions.flush()
    feedback.flush()


def make_plan(rollout_id: str = "r1", model_name: str = "fraud", previous_version: str | None = None) -> RolloutPlan:
    """A rollout of v5 (slot b) against champion v4 (slot a): shadow, then a 5 % canary, each 60 s and 100
    samples; two failures roll back; a 10-minute watch."""
    return RolloutPlan(
        rollout_id=rollout_id,
        model_name=model_name,
        challenger_version="5",
        champion_version="4",
        champion_slot="a",
        challenger_slot="b",
        phases=(PhaseSpec("shadow", "shadow", 0.0, 60.0, 100), PhaseSpec("canary-5", "canary", 0.05, 60.0, 100)),
        failure_limit=2,
        post_promotion_watch_s=600.0,
        previous_version=previous_version,
    )


def shadow_canary_spec(name: str, interval: float, watch_s: float, canary: dict[str, Any] | None = None) -> dict:
    """A rollout spec of seconds for a live stack: shadow, then a 50 % canary (with `canary`'s extra fields, e.g. a
    gate), each 1.5 s and 40 samples, judged by the error rate alone (also during the watch)."""
    return {
        "name": name,
        "analysis_interval_s": interval,
        "failure_limit": 2,
        "post_promotion_watch_s": watch_s,
        "phases": [
            {"name": "shadow", "kind": "shadow", "min_duration_s": 1.5, "min_samples": 40},
            {"name": "canary-50", "kind": "canary", "weight": 0.5, "min_duration_s": 1.5, "min_samples": 40}
            | (canary or {}),
        ],
        "guardrails": [
            {
                "name": "error-rate",
                "kind": "error_rate",
                "applies_to": ["shadow", "canary", "watch"],
                "min_samples": 40,
                "max_increase": 0.05,
                "max_rate": 0.1,
            }
        ],
    }


def registered_checkpoint_epoch(run_dir: Path) -> int:
    """The latest epoch whose checkpoint Ray Train has *registered*: listed in its manager snapshot, which is what
    a new driver restores from. A checkpoint folder alone is not enough: killed before the snapshot names it, a
    new driver cannot know it exists."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return 0
    registered = snapshot.read_text()
    epochs = [
        json.loads(path.read_text())["epoch"]
        for path in run_dir.glob("checkpoint_*/metrics.json")
        if path.parent.name in registered
    ]
    return max(epochs, default=0)


@contextlib.contextmanager
def running_prometheus(root: Path, targets: list[str], job: str = "scraped") -> Iterator[str]:
    """A real Prometheus (Debian's package, which .ci/run installs) on a free loopback port, scraping the
    `targets` (host:port, their /metrics) every second, its data under `root`; yields its URL and stops it after."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise AssertionError("prometheus is missing: install Debian's prometheus package (.ci/run does)")
    root.mkdir(parents=True, exist_ok=True)
    config = root / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: {job}\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    port = free_port()
    server = start_process(
        "prometheus",
        [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        env={"PATH": "/usr/bin:/bin"},
        log_dir=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, f"{url}/-/ready", timeout=60)
        yield url
    finally:
        stop_process(server)


def wait_for_scrapes(url: str, metric: str, count: int, timeout: float = 30.0) -> None:
    """Wait until Prometheus at `url` holds at least `count` samples of `metric` from the last minute (so looks
    a second apart all have data), or fail naming the metric."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = httpx.get(f"{url}/api/v1/query", params={"query": f"count_over_time({metric}[1m])"}).json()
        if found["data"]["result"] and float(found["data"]["result"][0]["value"][1]) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus at {url} never scraped {count} samples of {metric} within {timeout:g} s")


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `condition` every 0.25 s until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")
