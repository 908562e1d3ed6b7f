"""Distributed training with Ray Train (`TorchTrainer`, DDP over gloo) and checkpoint recovery.

Fault tolerance, in the two ways it is needed:
- a worker dies: `FailureConfig(max_failures)` makes Ray restart the worker group, and the training
  function resumes from `ray.train.get_checkpoint()` (the latest epoch checkpoint), not from epoch 0;
- the driver dies: running again with the same `(storage_path, run_name)` makes Ray Train restore its
  checkpoint manager from storage, so the new run resumes from the latest checkpoint as well.

The checkpoint carries its own bookkeeping (epoch, history, restart count, where we resumed from) so
the result can be read from storage alone, locally or on S3, without side files.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.dataset import read_transactions, split_by_account
from core.model import FraudScorer, NetworkConfig, Preprocessor, build_network
from core.schema import LABEL

CHECKPOINT_STATE = "state.pt"
S3_SCHEME = "s3://"


@dataclass
class TrainParams:
    workers: int = 2
    epochs: int = 6
    batch_size: int = 512
    learning_rate: float = 3e-3
    max_failures: int = 2
    seed: int = 0
    validation_fraction: float = 0.1
    inject_failure_at_epoch: int | None = None  # 1-based epoch in which one worker process dies
    inject_error_at_epoch: int | None = None  # 1-based epoch in which the training loop raises (a bug)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.inject_failure_at_epoch is not None and not 1 <= self.inject_failure_at_epoch <= self.epochs:
            raise ValueError(f"inject_failure_at_epoch must be in 1..{self.epochs}, got {self.inject_failure_at_epoch}")
        if self.inject_error_at_epoch is not None and not 1 <= self.inject_error_at_epoch <= self.epochs:
            raise ValueError(f"inject_error_at_epoch must be in 1..{self.epochs}, got {self.inject_error_at_epoch}")
        if self.inject_failure_at_epoch is not None and self.max_failures < 1:
            raise ValueError("injecting a worker failure needs max_failures >= 1 to recover")

    def entry_args(self) -> list[str]:
        """These parameters as `components.train_entry` arguments: one rendering for the local attempts
        (`components.train_attempts`) and the RayJob (`components.rayjob`), so the two cannot drift apart."""
        args = [
            "--workers", str(self.workers),
            "--epochs", str(self.epochs),
            "--batch-size", str(self.batch_size),
            "--learning-rate", repr(float(self.learning_rate)),
            "--max-failures", str(self.max_failures),
            "--seed", str(self.seed),
        ]  # fmt: skip
        if self.inject_failure_at_epoch:
            args += ["--inject-failure-at-epoch", str(self.inject_failure_at_epoch)]
        if self.inject_error_at_epoch:
            args += ["--inject-error-at-epoch", str(self.inject_error_at_epoch)]
        return args


@dataclass
class TrainOutcome:
    run_name: str
    checkpoint: str
    model_dir: str
    epochs_completed: int
    restarts: int
    resumed_from_epoch: int | None
    metrics: dict[str, float]
    history: list[dict[str, float]]
    wall_seconds: float
    train_rows: int
    rows_per_second: float
    params: dict[str, Any]
    attempts: int = 1  # Ray clusters the step used (components.train_attempts); 1 when none was lost

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_model(
    data_path: str | Path, storage_path: str | Path, run_name: str, params: TrainParams, model_dir: str | Path
) -> TrainOutcome:
    """Train on the training side of `split_by_account`, checkpointing under `storage_path/run_name`.

    Writes the final model as a `FraudScorer` directory to `model_dir` and returns what happened.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_frame, _ = split_by_account(read_transactions(data_path))
    fit_frame, validation_frame = split_by_account(train_frame, params.validation_fraction, salt="validation")
    if fit_frame[LABEL].sum() == 0:
        raise ValueError("the training data has no fraud labels at all; cannot train a fraud model")
    preprocessor = Preprocessor.fit(fit_frame)

    storage, filesystem = storage_for(storage_path)
    if filesystem is None:
        work = Path(storage_path) / run_name
        work.mkdir(parents=True, exist_ok=True)
        fit_path, validation_path = work / "fit.parquet", work / "validation.parquet"
        fit_frame.to_parquet(fit_path, index=False)
        validation_frame.to_parquet(validation_path, index=False)
        failure_marker = str(work / "failure-injected")
    else:
        # On S3 every Ray worker, on whichever pod, reads the same objects: nothing is on a shared disk.
        work_uri = f"{S3_SCHEME}{storage}/{run_name}"
        fit_path, validation_path = f"{work_uri}/fit.parquet", f"{work_uri}/validation.parquet"
        _write_frame(fit_frame, fit_path)
        _write_frame(validation_frame, validation_path)
        failure_marker = f"{work_uri}/failure-injected"

    config = {
        "fit_path": str(fit_path),
        "validation_path": str(validation_path),
        "preprocessor": asdict(preprocessor),
        "params": asdict(params),
        "failure_marker": failure_marker,
    }
    # Ray Train checks worker health every 2 s by default; a faster check shortens recovery on a laptop.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    started_ray = _ensure_ray(params.workers)
    try:
        trainer = TorchTrainer(
            train_fn,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=params.workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=params.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        started = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - started
    finally:
        if started_ray:
            ray.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = _load_state(Path(directory))
    scorer = FraudScorer(preprocessor, _network_from_state(preprocessor, params.network, state), params.network)
    scorer.save(model_dir)
    epochs_done = int(state["epoch"])
    epoch_seconds = sum(entry["epoch_seconds"] for entry in state["history"])
    return TrainOutcome(
        run_name=run_name,
        checkpoint=result.checkpoint.path if filesystem is None else f"{S3_SCHEME}{result.checkpoint.path}",
        model_dir=str(model_dir),
        epochs_completed=epochs_done,
        restarts=int(state["restarts"]),
        resumed_from_epoch=state["resumed_from_epoch"],
        metrics=dict(state["history"][-1]),
        history=list(state["history"]),
        wall_seconds=round(wall, 3),
        train_rows=len(fit_frame),
        rows_per_second=round(len(fit_frame) * epochs_done / max(epoch_seconds, 1e-9), 1),
        params=asdict(params),
    )


def _ensure_ray(workers: int) -> bool:
    """Start a small local Ray if none is connected; returns True when we started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    # Logical CPUs: one per worker plus one for Ray Train's controller, whatever the machine has.
    ray.init(
        num_cpus=workers + 1,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def train_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    torch.set_num_threads(1)  # one core per worker; more threads just fight over the same cores
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    params = TrainParams(**{**config["params"], "network": NetworkConfig(**config["params"]["network"])})
    preprocessor = Preprocessor(**config["preprocessor"])
    shard = _read_frame(config["fit_path"]).iloc[rank::world]
    numeric, categorical = preprocessor.transform(shard)
    labels = shard[LABEL].to_numpy(dtype="float32")
    validation = _read_frame(config["validation_path"])
    val_numeric, val_categorical = preprocessor.transform(validation)
    val_labels = validation[LABEL].to_numpy()

    torch.manual_seed(params.seed)
    network = build_network(preprocessor, params.network)
    optimizer = torch.optim.AdamW(network.parameters(), lr=params.learning_rate, weight_decay=1e-4)
    start_epoch, history, restarts, resumed_from = 0, [], 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = _load_state(Path(directory))
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        restarts, resumed_from = int(state["restarts"]) + 1, int(state["epoch"])
    model = prepare_model(network) if world > 1 else network
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if checkpoint is not None and start_epoch >= params.epochs:
        # Re-run after a driver crash that came after the last epoch: nothing left to train, but say so
        # in a final report, so the outcome records the resume instead of looking like a fresh run.
        state = {
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": start_epoch,
            "history": history,
            "restarts": restarts,
            "resumed_from_epoch": resumed_from,
        }
        _report(dict(history[-1]), state, rank)
        return

    for epoch in range(start_epoch, params.epochs):
        model.train()
        order = np.random.default_rng(params.seed * 1000 + epoch).permutation(len(labels))
        batches = np.array_split(order, max(1, len(order) // params.batch_size))
        epoch_started = time.perf_counter()
        total = 0.0
        for step, index in enumerate(batches):
            optimizer.zero_grad()
            loss = loss_fn(
                model(torch.from_numpy(numeric[index]), torch.from_numpy(categorical[index])),
                torch.from_numpy(labels[index]),
            )
            loss.backward()
            optimizer.step()
            total += float(loss)
            if step == len(batches) // 2:
                _maybe_inject_failure(config, params, epoch + 1, rank, world, step)
                if params.inject_error_at_epoch == epoch + 1:
                    raise RuntimeError(f"injected training-loop error at epoch {epoch + 1} (a bug, not a lost cluster)")
        metrics = {
            "epoch": epoch + 1,
            "train_loss": total / len(batches),
            "epoch_seconds": time.perf_counter() - epoch_started,
            **_validation_metrics(network, val_numeric, val_categorical, val_labels),
        }
        history.append(metrics)
        state = {
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "restarts": restarts,
            "resumed_from_epoch": resumed_from,
        }
        _report(metrics, state, rank)


def _report(metrics: dict[str, float], state: dict[str, Any], rank: int) -> None:
    """Every rank reports (Ray Train syncs on it); only rank 0 writes the checkpoint."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save(state, Path(directory) / CHECKPOINT_STATE)
            (Path(directory) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_inject_failure(
    config: dict[str, Any], params: TrainParams, epoch: int, rank: int, world: int, step: int
) -> None:
    """Fault injection for tests and benchmarks: the last rank dies once, mid-epoch, like an OOM kill."""
    if params.inject_failure_at_epoch != epoch or rank != world - 1 or step == 0:
        return
    marker = config["failure_marker"]
    if storage_exists(marker):
        return  # already died once in this run; recovery must now succeed
    write_text(marker, f"worker {rank} killed at epoch {epoch} step {step}\n")
    # A real crash lands long after the last checkpoint; with epochs of a few seconds, give Ray Train's
    # controller one health-check interval to register the previous epoch's report first, so the test
    # measures recovery rather than a polling race.
    time.sleep(1.0)
    os._exit(1)


def _validation_metrics(
    network: Any, numeric: np.ndarray, categorical: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    import torch
    from sklearn.metrics import average_precision_score, log_loss

    network.eval()
    with torch.inference_mode():
        scores = torch.sigmoid(network(torch.from_numpy(numeric), torch.from_numpy(categorical))).numpy()
    network.train()
    has_both = 0 < labels.sum() < len(labels)
    return {
        "val_log_loss": float(log_loss(labels, scores, labels=[0, 1])) if len(labels) else float("nan"),
        "val_pr_auc": float(average_precision_score(labels, scores)) if has_both else float("nan"),
    }


def _load_state(directory: Path) -> dict[str, Any]:
    import torch

    return torch.load(directory / CHECKPOINT_STATE, map_location="cpu", weights_only=False)


def _network_from_state(preprocessor: Preprocessor, config: NetworkConfig, state: dict[str, Any]) -> Any:
    network = build_network(preprocessor, config)
    network.load_state_dict(state["model"])
    return network


# --- storage: a local directory, or S3 (MinIO on the kind target) through pyarrow.fs ----------------------


def is_s3(path: str | Path) -> bool:
    return str(path).startswith(S3_SCHEME)


def s3_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`pyarrow.fs.S3FileSystem` keyword arguments from the standard variables: the endpoint from
    `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` or `MLFLOW_S3_ENDPOINT_URL` (MinIO: `http://minio:9000`, so
    plain HTTP and path-style addressing), the keys from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {"region": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or env.get("MLFLOW_S3_ENDPOINT_URL")
    if endpoint:
        scheme, sep, rest = endpoint.partition("://")
        if not sep:
            scheme, rest = "https", endpoint
        options["endpoint_override"] = rest.rstrip("/")
        options["scheme"] = scheme
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["access_key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
    return options


def s3_filesystem(env: Mapping[str, str] | None = None) -> Any:
    from pyarrow import fs

    return fs.S3FileSystem(**s3_options(env))


def storage_for(storage_path: str | Path) -> tuple[str, Any]:
    """Where Ray Train keeps a run: `(path, None)` for a local directory (the absolute path, as before), or
    `("bucket/prefix", S3FileSystem)` for `s3://bucket/prefix`: Ray wants the path without its scheme when it
    is given the filesystem, and the filesystem is how we point it at MinIO rather than AWS."""
    if is_s3(storage_path):
        return str(storage_path)[len(S3_SCHEME) :].rstrip("/"), s3_filesystem()
    return str(Path(storage_path).resolve()), None


def _resolve(uri: str | Path) -> tuple[Any, str]:
    """`(filesystem, path on it)` for a local path or an `s3://` URI."""
    from pyarrow import fs

    if is_s3(uri):
        return s3_filesystem(), str(uri)[len(S3_SCHEME) :]
    return fs.LocalFileSystem(), str(Path(uri).resolve())


def storage_exists(uri: str | Path) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    from pyarrow import fs

    filesystem, path = _resolve(uri)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def write_text(uri: str | Path, text: str) -> None:
    if not is_s3(uri):
        Path(uri).write_text(text)
        return
    filesystem, path = _resolve(uri)
    with filesystem.open_output_stream(path) as stream:  # S3 has no directories to create first
        stream.write(text.encode())


def read_text(uri: str | Path) -> str:
    if not is_s3(uri):
        return Path(uri).read_text()
    filesystem, path = _resolve(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def copy_tree(source: str | Path, destination: str | Path) -> None:
    """Copy a file or a directory tree between local paths and `s3://` URIs (model dirs, data files)."""
    from pyarrow import fs

    source_fs, source_path = _resolve(source)
    destination_fs, destination_path = _resolve(destination)
    if not is_s3(destination):
        is_file = source_fs.get_file_info(source_path).type == fs.FileType.File
        Path(destination_path if not is_file else Path(destination_path).parent).mkdir(parents=True, exist_ok=True)
    fs.copy_files(source_path, destination_path, source_fs, destination_fs)


def _write_frame(frame: Any, uri: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, path = _resolve(uri)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, filesystem=filesystem)


def _read_frame(uri: str) -> Any:
    """A training file: a local path (as before) or an object on S3."""
    if not is_s3(uri):
        return read_transactions(uri)
    import pyarrow.parquet as pq

    filesystem, path = _resolve(uri)
    return pq.read_table(path, filesystem=filesystem).to_pandas()
