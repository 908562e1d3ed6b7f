"""`python -m components.train_entry ...`: the Ray training as a program, what a KubeRay `RayJob` runs.

The same `components.train.train_model` as the local path, with its inputs and outputs as URIs (a local
path or `s3://bucket/key`), because on the cluster the driver runs on the Ray head pod and shares no disk
with the pipeline step that submitted it:

- `--data` is downloaded to a temporary file when it is on S3;
- checkpoints go to `--storage` (`s3://checkpoints` on kind); running again with the same `--run-name`
  resumes from the latest checkpoint, which is what a RayJob retry (`backoffLimit`) relies on;
- the model directory is uploaded to `--model-out`, and the `TrainOutcome` is written as JSON to
  `--outcome` (the submitter reads that object back) and printed as the last stdout line.

Every argument value is a plain word (no spaces or quotes): KubeRay passes the entrypoint through a shell
twice (the submitter's `bash -c`, then `ray job submit` joins and runs it), see `components.rayjob`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from components.train import TrainOutcome, TrainParams, copy_tree, is_s3, train_model, write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.train_entry", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Parquet file of transactions: a path or s3:// URI")
    parser.add_argument("--storage", required=True, help="Ray Train storage: a directory or s3://bucket[/prefix]")
    parser.add_argument("--run-name", required=True, help="checkpoint run name; the same name resumes")
    parser.add_argument("--model-out", required=True, help="where the model directory goes: a path or s3:// URI")
    parser.add_argument("--outcome", required=True, help="where the outcome JSON goes: a path or s3:// URI")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-failures", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inject-failure-at-epoch", type=int, default=0, help="0: none")
    parser.add_argument("--inject-error-at-epoch", type=int, default=0, help="0: none; the loop raises (tests)")
    return parser.parse_args(argv)


def params_from(args: argparse.Namespace) -> TrainParams:
    return TrainParams(
        workers=args.workers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_failures=args.max_failures,
        seed=args.seed,
        inject_failure_at_epoch=args.inject_failure_at_epoch or None,
        inject_error_at_epoch=args.inject_error_at_epoch or None,
    )


def run(args: argparse.Namespace) -> TrainOutcome:
    params = params_from(args)
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the driver joins the RayJob's cluster; without it `train_model` would
        # start a private single-node Ray (which is what it does when run by hand).
        import ray

        ray.init(log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="train-entry-") as scratch:
        data_path = args.data
        if is_s3(data_path):
            data_path = str(Path(scratch) / "data.parquet")
            copy_tree(args.data, data_path)
        local_model = Path(scratch) / "model" if is_s3(args.model_out) else Path(args.model_out)
        outcome = train_model(data_path, args.storage, args.run_name, params, local_model)
        if is_s3(args.model_out):
            copy_tree(local_model, args.model_out.rstrip("/"))
    outcome.model_dir = args.model_out
    if not is_s3(args.outcome):
        Path(args.outcome).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.outcome, json.dumps(outcome.to_dict(), indent=2))
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when trained; `EXIT_CLUSTER_LOST` (75) when the Ray cluster went away under the driver, which a
    new attempt on a new cluster can recover from; `EXIT_TRAINING_FAILED` (3) for any other error (a bug in the
    training loop, bad data): see `components.train_attempts`."""
    from components.train_attempts import exit_code_for

    args = parse_args(argv)
    try:
        outcome = run(args)
    except Exception as error:
        traceback.print_exc()
        code = exit_code_for(error)
        print(f"train_entry: {type(error).__name__}; exit {code}", file=sys.stderr, flush=True)
        return code
    sys.stdout.flush()
    print(json.dumps(outcome.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
