"""The models a scenario needs: a trained champion, and a challenger built from a trained model.

Training is real (Ray Train, the same `components.train_attempts.train_in_fresh_clusters` the pipeline runs)
but done once per seed and cached under `MLOPS_HOME/scenarios/models`, so a second scenario run costs seconds.
A challenger with a deliberate defect is a wrapper of a trained model: the same weights plus `defect.json`, which
the slot honours (`serving.slot.Defect`). Every challenger is registered as a new MLflow version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.dataset import write_transactions
from components.train import TrainParams
from components.train_attempts import train_in_fresh_clusters
from core.aliases import CHAMPION
from core.registry import alias_version, connect, log_training_run, register_version
from core.settings import Settings
from core.synthetic import generate_transactions

TRAIN_ROWS = 40_000
TRAIN_EPOCHS = 4
CHAMPION_SEED = 1


def trained_model(settings: Settings, seed: int, on_progress: Any = print) -> tuple[Path, Path, dict[str, Any]]:
    """(model dir, training data, training summary) for `seed`, training it the first time."""
    root = settings.home / "scenarios" / "models" / f"seed-{seed}"
    model_dir, data_path, summary_path = root / "model", root / "train.parquet", root / "summary.json"
    if summary_path.exists() and model_dir.exists():
        return model_dir, data_path, json.loads(summary_path.read_text())
    on_progress(f"training the seed-{seed} model ({TRAIN_ROWS} rows, {TRAIN_EPOCHS} epochs, Ray Train)")
    root.mkdir(parents=True, exist_ok=True)
    write_transactions(generate_transactions(TRAIN_ROWS, seed=seed), data_path)
    params = TrainParams(
        workers=1, epochs=TRAIN_EPOCHS, seed=seed, batch_size=settings.train_batch_size, max_failures=1
    )
    with tempfile.TemporaryDirectory(prefix="scenario-train-") as storage:
        # A lost Ray cluster (an OOM kill of its raylet) is retried on a new one, as the pipeline's step does.
        outcome = train_in_fresh_clusters(
            data_path,
            storage,
            f"scenario-seed-{seed}",
            params,
            root / "staging",
            settings.train_cluster_retries,
            settings.logs_dir,
            on_progress,
        )
    shutil.rmtree(model_dir, ignore_errors=True)
    Path(outcome.model_dir).rename(model_dir)
    summary = {"seed": seed, "metrics": outcome.metrics, "history": outcome.history, "params": outcome.params}
    summary_path.write_text(json.dumps(summary, indent=2, default=str))  # written last: marks the cache complete
    on_progress(f"seed-{seed} model trained: validation PR-AUC {outcome.metrics.get('val_pr_auc', float('nan')):.3f}")
    return model_dir, data_path, summary


def cache_from_version(settings: Settings, seed: int, version: str) -> None:
    """Use a version the training pipeline already registered as the seed's trained model (the demo does this
    so that its rollback scenario wraps the model it just trained instead of training another)."""
    from core.registry import download_model

    root = settings.home / "scenarios" / "models" / f"seed-{seed}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="scenario-base-") as workdir:
        model_dir, reference = download_model(f"models:/{settings.model_name}/{version}", workdir)
        shutil.copytree(model_dir, root / "model")
        shutil.copy(reference, root / "train.parquet")
    summary = {"seed": seed, "metrics": {}, "history": [], "params": {"from_version": version}}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))


def register(
    settings: Settings, seed: int, label: str, defect: dict[str, Any] | None = None, on_progress: Any = print
) -> str:
    """Register the seed's trained model (with `defect` baked in, if any) as a new version; return it."""
    model_dir, data_path, summary = trained_model(settings, seed, on_progress)
    with tempfile.TemporaryDirectory(prefix="scenario-model-") as workdir:
        staged = Path(workdir) / "model"
        shutil.copytree(model_dir, staged)
        if defect:
            (staged / "defect.json").write_text(json.dumps(defect))
        tags = {"mlops.run_name": f"scenario-{label}", "mlops.scenario": label, "mlops.defect": json.dumps(defect)}
        logged = log_training_run(settings, staged, data_path, summary["params"], summary["history"], tags)
        version, _ = register_version(settings, logged.model_uri, logged.run_id, {"mlops.scenario": label})
    return version


def ensure_champion(settings: Settings, on_progress: Any = print) -> str:
    """The champion's version, registering the trained seed-1 model as champion when there is none."""
    client = connect(settings)
    champion = alias_version(client, settings.model_name, CHAMPION)
    if champion is not None:
        return champion
    version = register(settings, CHAMPION_SEED, "champion", on_progress=on_progress)  # the first is champion
    on_progress(f"registered version {version} as the first champion")
    return version
