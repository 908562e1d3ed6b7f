"""The live view of a local pipeline run (mlops/run_view.py): the steps' states read from KFP's local log, the
view a person reads, and that it is drawn on the terminal's stream even while the runner has swapped
`sys.stderr` for the run's log (the defect: `mlops run` showed nothing for the whole run and the log held
the spinner's frames). Under a real terminal it is tested in tests/test_training_pipeline.py (tmux)."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

from rich.console import Console

from mlops.run_view import PipelineProgress, StepState, format_seconds, pipeline_view, step_states
from pipelines.runner import STEPS

CYAN, GREEN, RED, RESET = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"


def executing(step: str) -> str:
    return f"17:13:55.120 - INFO - Executing task {CYAN}'{step}-op'{RESET}"


def finished(step: str, status: str = "SUCCESS") -> str:
    color = GREEN if status == "SUCCESS" else RED
    return f"17:14:01.311 - INFO - Task {CYAN}'{step}-op'{RESET} finished with status {color}{status}{RESET}"


def test_step_states_follow_kfp_local_log_lines_with_their_colours() -> None:
    log = "\n".join([executing("ingest"), "some step output", finished("ingest"), executing("validate")])
    assert step_states(log, STEPS)[:3] == [
        StepState("ingest", "done"),
        StepState("validate", "running"),
        StepState("drift-check", "pending"),
    ]
    failed = "\n".join([executing("ingest"), finished("ingest", "FAILURE")])
    assert step_states(failed, STEPS)[0] == StepState("ingest", "failed")
    assert {s.status for s in step_states("", STEPS)} == {"pending"}


def test_elapsed_times_read_as_a_person_reads_them() -> None:
    assert [format_seconds(s) for s in (0.4, 42.9, 65, 3600)] == ["0s", "42s", "1m 05s", "60m 00s"]


def render(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_the_view_names_the_current_step_and_the_elapsed_time() -> None:
    states = step_states("\n".join([executing("ingest"), finished("ingest"), executing("validate")]), STEPS)
    text = render(pipeline_view("pipeline run r1", states, 65.2, {"ingest": 5.0, "validate": 2.0}))
    assert "pipeline run r1  step 2/7: validate  elapsed 1m 05s" in text
    assert "✓  ingest       done     5s" in text
    assert "▶  validate     running  2s" in text
    assert "·  deploy       pending" in text


def test_the_view_is_drawn_on_the_terminal_while_the_run_sends_stderr_to_its_log(tmp_path: Path) -> None:
    terminal = io.StringIO()
    log_path = tmp_path / "pipeline.log"
    # What run_local does inside the view: the steps' output, and sys.stdout/sys.stderr, go to the log.
    with (
        PipelineProgress(log_path, "pipeline run r2", STEPS, stream=terminal, interval_s=0.05),
        open(log_path, "w", buffering=1) as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        for step in STEPS:
            print(executing(step))
            print(finished(step))
        time.sleep(0.3)  # the view reads the log while it is swapped in
    drawn = terminal.getvalue()
    assert "pipeline run r2  step 7/7  elapsed" in drawn
    assert "✓  deploy" in drawn
    logged = log_path.read_text()
    assert "elapsed" not in logged and "✓" not in logged  # nothing of the view in the log
    assert logged.count("Executing task") == len(STEPS)
