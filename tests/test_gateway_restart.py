"""A restarted gateway serves as soon as it has a policy (`fault-gateway-kill`: its clients wait 10 s at most).

The history of the prediction log (request ids and labels, so that labels for requests served before the restart
are still judged) is loaded in the background: scoring never waits for it, /v1/feedback does. The gateway is the
real `serving.gateway.Gateway` in this process, on real Parquet files; the history's read is held up by a FIFO
named like a log file (a real slow read: it blocks until a writer opens it).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from core.prediction_log import FEEDBACK_SCHEMA, PREDICTION_SCHEMA, BatchedParquetLog, RecentIds
from core.settings import Settings
from serving.gateway import Gateway


def test_ids_loaded_after_serving_started_are_older_than_the_ids_served_meanwhile() -> None:
    held = RecentIds(capacity=3)
    held.add("new-1")
    older = RecentIds(capacity=3)
    for request_id in ("old-1", "old-2", "old-3"):
        older.add(request_id)
    held.add_older(older)
    assert "new-1" in held and len(held) == 3
    assert "old-1" not in held  # the capacity evicts the oldest, never what was served since the restart
    held.add("new-2")
    assert "old-2" not in held and {"old-3", "new-1", "new-2"} == {i for i in ("old-3", "new-1", "new-2") if i in held}


def write_history(settings: Settings) -> None:
    predictions = BatchedParquetLog(settings.prediction_log_dir / "predictions", 10, 1.0, schema=PREDICTION_SCHEMA)
    predictions.append({"request_id": "old-1", "ts": time.time() - 60, "variant": "champion", "status": "ok"})
    predictions.flush()
    feedback = BatchedParquetLog(settings.prediction_log_dir / "feedback", 10, 1.0, schema=FEEDBACK_SCHEMA)
    feedback.append({"request_id": "old-1", "label": 1, "received_at": time.time() - 50})
    feedback.flush()


def test_a_restarted_gateway_starts_before_its_history_is_read_and_judges_labels_on_it(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", labels_token="labels", control_plane_url="http://127.0.0.1:9")
    write_history(settings)
    fifo = settings.prediction_log_dir / "predictions" / "zz-slow.parquet"  # sorted last: read first
    os.mkfifo(fifo)

    async def scenario() -> None:
        gateway = Gateway(settings)
        started = time.perf_counter()
        await asyncio.wait_for(gateway.start(), 5.0)
        try:
            assert time.perf_counter() - started < 5.0
            assert not gateway.history_loaded.is_set()  # the history's read is still held up by the FIFO
            gateway.known_ids.add("new-1")  # served meanwhile
            # Release the read: a writer opens the FIFO and closes it (an empty file: not Parquet).
            await asyncio.to_thread(lambda: open(fifo, "wb").close())
            await asyncio.wait_for(gateway.history_loaded.wait(), 10.0)
        finally:
            await gateway.stop()

    asyncio.run(scenario())


def test_labels_for_requests_served_before_the_restart_are_judged_on_the_loaded_history(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", labels_token="labels", control_plane_url="http://127.0.0.1:9")
    write_history(settings)

    async def scenario() -> tuple[int, int, int]:
        gateway = Gateway(settings)
        await gateway.start()
        try:
            gateway.known_ids.add("new-1")
            await asyncio.wait_for(gateway.history_loaded.wait(), 10.0)
            auth = "Bearer labels"
            conflict, _ = gateway.record_feedback(b'{"request_id": "old-1", "label": 0}', auth)
            again, _ = gateway.record_feedback(b'{"request_id": "old-1", "label": 1}', auth)
            fresh, _ = gateway.record_feedback(b'{"request_id": "new-1", "label": 0}', auth)
            return conflict, again, fresh
        finally:
            await gateway.stop()

    assert asyncio.run(scenario()) == (409, 200, 202)


def test_a_stop_writes_the_log_and_names_a_background_task_that_had_died(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(home=tmp_path / "home", labels_token="labels", control_plane_url="http://127.0.0.1:9")

    async def crash() -> None:
        raise RuntimeError("shadow worker bug")

    async def scenario() -> None:
        gateway = Gateway(settings)
        await gateway.start()
        gateway._tasks.append(asyncio.create_task(crash(), name="crashing-worker"))
        await asyncio.sleep(0.05)  # it has died
        gateway.predictions.append({"request_id": "served-before-the-stop"})
        gateway.feedback.append({"request_id": "served-before-the-stop", "label": 1, "received_at": time.time()})
        await gateway.stop()

    with caplog.at_level("ERROR", logger="mlops.gateway"):
        asyncio.run(scenario())
    assert any("crashing-worker" in r.getMessage() and "shadow worker bug" in r.getMessage() for r in caplog.records)
    for log_name in ("predictions", "feedback"):
        files = list((settings.prediction_log_dir / log_name).glob("*.parquet"))
        assert len(files) == 1, log_name
