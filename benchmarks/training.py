"""Training benchmark: pipeline wall time, Ray Train throughput (1 vs 2 workers), cost of a worker failure.

Everything runs in one invocation on the same machine, so the figures compare side by side. Prints one
JSON object (the last stdout line) and exits non-zero when a target is missed.

    .venv/bin/python benchmarks/training.py [--rows 50000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.dataset import write_transactions  # noqa: E402
from components.train import TrainParams, train_model  # noqa: E402
from core.synthetic import generate_transactions  # noqa: E402

PIPELINE_TARGET_S = 120.0
RECOVERY_SLACK_S = 20.0


def pipeline_wall_time(rows: int, epochs: int, home: Path) -> dict[str, Any]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}, "MLOPS_HOME": str(home)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mlops.cli", "run", "--generate", str(rows), "--param", f"epochs={epochs}", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    wall = time.perf_counter() - started
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"status": "NO OUTPUT"}
    return {
        "seconds": round(wall, 1),
        "status": result.get("status"),
        "test_pr_auc": result.get("metrics", {}).get("test_pr_auc"),
        "target_seconds": PIPELINE_TARGET_S,
        "meets_target": wall <= PIPELINE_TARGET_S and result.get("status") == "SUCCEEDED",
    }


def training_run(
    data: Path, storage: Path, name: str, workers: int, epochs: int, fail_at: int | None = None
) -> dict[str, Any]:
    params = TrainParams(workers=workers, epochs=epochs, inject_failure_at_epoch=fail_at)
    started = time.perf_counter()
    outcome = train_model(data, storage, name, params, storage / f"{name}-model")
    wall = time.perf_counter() - started
    epoch_times = [entry["epoch_seconds"] for entry in outcome.history]
    return {
        "workers": workers,
        "wall_seconds": round(wall, 2),
        "fit_seconds": outcome.wall_seconds,
        "rows_per_second": outcome.rows_per_second,
        "mean_epoch_seconds": round(sum(epoch_times) / len(epoch_times), 2),
        "restarts": outcome.restarts,
        "resumed_from_epoch": outcome.resumed_from_epoch,
        "val_pr_auc": round(outcome.metrics["val_pr_auc"], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        root = Path(tmp)
        data = write_transactions(generate_transactions(args.rows, seed=11), root / "data.parquet")
        one = training_run(data, root / "ckpt", "one-worker", 1, args.epochs)
        two = training_run(data, root / "ckpt", "two-workers", 2, args.epochs)
        failed = training_run(data, root / "ckpt", "two-workers-failure", 2, args.epochs, fail_at=args.epochs - 1)
        lost = failed["fit_seconds"] - two["fit_seconds"]
        allowed = two["mean_epoch_seconds"] + RECOVERY_SLACK_S
        pipeline = None if args.skip_pipeline else pipeline_wall_time(args.rows, args.epochs, root / "home")
    report = {
        "benchmark": "training",
        "rows": args.rows,
        "epochs": args.epochs,
        "cpus": os.cpu_count(),
        "pipeline": pipeline,
        "throughput": {
            "one_worker": one,
            "two_workers": two,
            "speedup_two_vs_one": round(two["rows_per_second"] / one["rows_per_second"], 2),
        },
        "recovery": {
            "clean": two,
            "with_failure": failed,
            "seconds_lost": round(lost, 1),
            "allowed_seconds": round(allowed, 1),
            "meets_target": lost <= allowed and failed["restarts"] == 1,
        },
    }
    print(json.dumps(report))
    ok = report["recovery"]["meets_target"] and (pipeline is None or pipeline["meets_target"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
