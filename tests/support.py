"""Helpers shared by serving tests and benchmarks: register small models without running Ray."""

from __future__ import annotations

import json
from pathlib import Path

from core.model import STATE_FILE, FraudScorer, NetworkConfig, Preprocessor, build_network
from core.registry import log_training_run, register_version
from core.settings import Settings
from core.synthetic import generate_transactions


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
