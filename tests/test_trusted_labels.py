"""Labels are evidence for an automatic decision (issue 12): only a holder of the labels token writes them, and
each request id takes one label.

On real processes (control plane, two BentoML slots, the BentoML gateway, models from a real MLflow server):
the label-poisoning attack on the challenger's requests, 401/403, 409 on a second different label (also
after a gateway restart), idempotent retries, unknown ids, and the counters. The controller's side (labels
that arrived before their request was served are no evidence) runs on real Parquet files of the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from control_plane.client import ControlPlaneClient
from control_plane.labels_token import labels_headers, labels_token_path, resolve_labels_token
from core.prediction_log import FEEDBACK_SCHEMA, BatchedParquetLog, read_feedback, served_times
from core.settings import Settings
from mlops.local_stack import LocalStack
from tests.test_serving_stack import MODEL, Traffic, gateway_generation, slot_version, wait_for, warm_up

LABELS_TOKEN = "labels-test-token"
WITH_TOKEN = {"Authorization": f"Bearer {LABELS_TOKEN}"}


@pytest.fixture(scope="module")
def label_stack(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    from tests.support import register_model

    root = tmp_path_factory.mktemp("labels-models")
    settings = Settings(home=root / "home", mlflow_tracking_uri=mlflow_server, model_name=MODEL + "-labels")
    v1, v2 = register_model(settings, root, seed=1), register_model(settings, root, seed=2)
    local = LocalStack(
        tmp_path_factory.mktemp("labels-home"),
        token="cp-token",
        labels_token=LABELS_TOKEN,
        extra_env={
            "MLOPS_MLFLOW_TRACKING_URI": mlflow_server,
            "MLOPS_MODEL_NAME": MODEL + "-labels",
            "MLOPS_LOG_FLUSH_SECONDS": "0.2",
        },
    )
    try:
        local.start()
        control = ControlPlaneClient(local.url("control-plane"), token="cp-token")
        control.assign("a", v1)
        control.assign("b", v2)
        policy = control.set_policy({"a": 0.5, "b": 0.5}, False, "a", "canary for the label tests")
        wait_for(lambda: slot_version(local, "a") == v1 and slot_version(local, "b") == v2)
        wait_for(lambda: gateway_generation(local) >= policy.generation)
        warm_up(local)
        yield local
    finally:
        local.stop()


def feedback_rows(stack: LocalStack) -> pd.DataFrame:
    files = sorted((stack.home / "prediction-log" / "feedback").glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=["request_id", "label", "received_at"])
    return pq.ParquetDataset(files).read().to_pandas().sort_values("received_at").reset_index(drop=True)


def post_label(stack: LocalStack, request_id: str, label: int, headers: dict[str, str] | None) -> httpx.Response:
    body = {"request_id": request_id, "label": label}
    return httpx.post(f"{stack.url('gateway')}/v1/feedback", json=body, headers=headers or {})


def feedback_counter(stack: LocalStack, outcome: str) -> float:
    for line in httpx.get(f"{stack.url('gateway')}/metrics").text.splitlines():
        if line.startswith(f'gateway_feedback_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_label_poisoning_without_the_token_changes_no_stored_label_and_relabelling_gets_409(
    label_stack: LocalStack,
) -> None:
    traffic = Traffic(label_stack.url("gateway"))
    answers = [traffic.score(i, f"acc_poison_{i}").json() for i in range(120)]
    challenger_ids = [a["request_id"] for a in answers if a["variant"] == "challenger"]
    assert len(challenger_ids) > 20, "half the accounts are routed to the challenger"
    # The honest label writer labels them clean.
    for request_id in challenger_ids:
        assert post_label(label_stack, request_id, 0, WITH_TOKEN).status_code == 202
    time.sleep(0.6)  # flushed (MLOPS_LOG_FLUSH_SECONDS=0.2)
    before = feedback_rows(label_stack)
    assert set(before["request_id"]) == set(challenger_ids) and set(before["label"]) == {0}

    # The attack: fraud labels on every challenger request, without the token, then with a wrong one.
    no_token = [post_label(label_stack, rid, 1, None) for rid in challenger_ids]
    wrong_token = [post_label(label_stack, rid, 1, {"Authorization": "Bearer guessed"}) for rid in challenger_ids]
    assert {r.status_code for r in no_token} == {401}
    assert {r.status_code for r in wrong_token} == {403}
    assert no_token[0].headers["www-authenticate"] == "Bearer"
    assert "MLOPS_LABELS_TOKEN" in no_token[0].json()["error"] and no_token[0].json()["field"] == "authorization"
    # With the token (a compromised or buggy writer): a second, different label is refused, not the latest.
    relabel = [post_label(label_stack, rid, 1, WITH_TOKEN) for rid in challenger_ids]
    assert {r.status_code for r in relabel} == {409}
    assert "labelled 0 already" in relabel[0].json()["error"] and relabel[0].json()["field"] == "label"
    time.sleep(0.6)
    pd.testing.assert_frame_equal(feedback_rows(label_stack), before)  # the stored feedback is unchanged

    n = len(challenger_ids)
    assert feedback_counter(label_stack, "unauthenticated") == n
    assert feedback_counter(label_stack, "forbidden") == n
    assert feedback_counter(label_stack, "conflict") == n


@pytest.mark.slow
def test_the_same_label_again_is_idempotent_and_unknown_ids_stay_404_and_are_counted(
    label_stack: LocalStack,
) -> None:
    traffic = Traffic(label_stack.url("gateway"))
    request_id = traffic.score(7, "acc_retry").json()["request_id"]
    assert post_label(label_stack, request_id, 1, WITH_TOKEN).status_code == 202
    retry = post_label(label_stack, request_id, 1, WITH_TOKEN)
    assert retry.status_code == 200 and retry.json() == {"request_id": request_id, "accepted": True, "duplicate": True}
    unknown_before = feedback_counter(label_stack, "unknown_id")
    unknown = post_label(label_stack, "never-served", 1, WITH_TOKEN)
    assert unknown.status_code == 404 and unknown.json()["field"] == "request_id"
    assert feedback_counter(label_stack, "unknown_id") == unknown_before + 1
    # Without the token, even an unknown id learns nothing but 401 (no oracle for which ids were served).
    assert post_label(label_stack, "never-served", 1, None).status_code == 401
    time.sleep(0.6)
    assert (feedback_rows(label_stack)["request_id"] == request_id).sum() == 1, "the retry is not logged twice"


@pytest.mark.slow
def test_a_restarted_gateway_still_refuses_a_second_label_for_an_id_labelled_before(
    label_stack: LocalStack,
) -> None:
    traffic = Traffic(label_stack.url("gateway"))
    request_id = traffic.score(9, "acc_restart").json()["request_id"]
    assert post_label(label_stack, request_id, 1, WITH_TOKEN).status_code == 202
    label_stack.stop("gateway")
    label_stack.start("gateway")
    wait_for(lambda: httpx.get(f"{label_stack.url('gateway')}/readyz").status_code == 200)
    assert post_label(label_stack, request_id, 0, WITH_TOKEN).status_code == 409
    assert post_label(label_stack, request_id, 1, WITH_TOKEN).status_code == 200


def _write(directory: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    log = BatchedParquetLog(directory, schema=schema)
    for row in rows:
        log.append(row)
    log.flush()


def test_the_controller_ignores_labels_that_arrived_before_their_request_was_served(tmp_path: Path) -> None:
    predictions = pd.DataFrame({"request_id": ["early", "late", "twice"], "ts": [100.0, 100.0, 100.0]})
    _write(
        tmp_path / "feedback",
        [
            {"request_id": "early", "label": 1, "received_at": 99.0},  # before the answer: no evidence
            {"request_id": "late", "label": 1, "received_at": 101.0},
            {"request_id": "twice", "label": 0, "received_at": 102.0},  # the first label is the one
            {"request_id": "twice", "label": 1, "received_at": 103.0},
        ],
        FEEDBACK_SCHEMA,
    )
    labels = read_feedback(tmp_path / "feedback", predictions["request_id"], served_times(predictions))
    assert dict(zip(labels["request_id"], labels["label"], strict=True)) == {"late": 1, "twice": 0}
    # Without the serving times (the drift monitor's use), the early label is still read: the filter is what drops it.
    unfiltered = read_feedback(tmp_path / "feedback", predictions["request_id"])
    assert "early" in set(unfiltered["request_id"])


def test_the_labels_token_is_generated_once_into_a_private_file_unless_set(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    token = resolve_labels_token(settings)
    assert len(token) >= 32 and resolve_labels_token(settings) == token
    assert labels_token_path(settings).stat().st_mode & 0o777 == 0o600
    assert labels_headers(settings) == {"Authorization": f"Bearer {token}"}
    assert resolve_labels_token(Settings(home=tmp_path / "home", labels_token="set")) == "set"
    assert json.dumps(token)  # printable, one line
