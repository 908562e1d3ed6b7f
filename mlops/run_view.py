"""The live view of a local pipeline run, on the terminal a person is looking at.

KFP's local runner prints every step's output, and the run (`pipelines.runner.run_local`) sends it into the
run's `pipeline.log` by swapping `sys.stdout`/`sys.stderr` for the log file while the pipeline runs. A
display that writes to `sys.stderr` at that moment writes into the log (the spinner's frames used to end
up there, and the terminal showed nothing for the whole run). So this view pins its console to the
terminal's stream when it starts, before the swap, and follows the run from the parent process by reading
the log the runner writes: which step runs, which are done, how long each took and the run's elapsed time.

`step_states` is a pure function of the log's text; `pipeline_view` renders; `PipelineProgress` is the
thin part with a thread and a rich `Live`.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

StepStatus = Literal["pending", "running", "done", "failed"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '?([\w-]+?)(?:-op)?'?\s*$")
_FINISHED = re.compile(r"Task '?([\w-]+?)(?:-op)?'? finished with status (\w+)")


@dataclass(frozen=True)
class StepState:
    name: str
    status: StepStatus


def step_states(log_text: str, steps: Sequence[str]) -> list[StepState]:
    """Each step's status from KFP's local log lines ("Executing task 'train-op'", "Task 'train-op' finished
    with status SUCCESS"); a step the log does not name yet is pending."""
    status: dict[str, StepStatus] = {}
    for raw in log_text.splitlines():
        line = _ANSI.sub("", raw).strip()
        finished = _FINISHED.search(line)
        if finished:
            status[finished.group(1)] = "done" if finished.group(2) == "SUCCESS" else "failed"
            continue
        executing = _EXECUTING.search(line)
        if executing and status.get(executing.group(1)) not in ("done", "failed"):
            status[executing.group(1)] = "running"
    return [StepState(step, status.get(step, "pending")) for step in steps]


def format_seconds(seconds: float) -> str:
    """`42s`, `1m 05s`: elapsed times as a person reads them."""
    whole = int(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m {whole % 60:02d}s"


_MARKS = {"pending": "[dim]·[/dim]", "running": "[cyan]▶[/cyan]", "done": "[green]✓[/green]", "failed": "[red]✗[/red]"}


def pipeline_view(title: str, states: Sequence[StepState], elapsed_s: float, step_seconds: dict[str, float]) -> Group:
    """The run's title with its elapsed time, then one line per step: mark, name, status and time taken."""
    current = next((s.name for s in states if s.status == "running"), None)
    done = sum(1 for s in states if s.status == "done")
    headline = Text.from_markup(
        f"[bold]{title}[/bold]  step {done + (1 if current else 0)}/{len(states)}"
        f"{f': [cyan]{current}[/cyan]' if current else ''}  elapsed {format_seconds(elapsed_s)}"
    )
    table = Table.grid(padding=(0, 2))
    for state in states:
        took = step_seconds.get(state.name)
        table.add_row(
            _MARKS[state.status],
            state.name,
            state.status,
            format_seconds(took) if took is not None and state.status != "pending" else "",
        )
    return Group(headline, table)


class PipelineProgress:
    """A live view of a run, drawn on `stream` (default: the process's stderr as it is now, which must be
    the terminal, not the log the runner swaps in later), following the run's log every `interval_s`."""

    def __init__(
        self, log_path: Path, title: str, steps: Sequence[str], stream: TextIO | None = None, interval_s: float = 0.5
    ) -> None:
        self.log_path, self.title, self.steps, self.interval_s = log_path, title, list(steps), interval_s
        # Bound to the stream object itself: rich's default console looks sys.stderr up at every write.
        self.console = Console(file=stream or sys.stderr, stderr=True, soft_wrap=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="pipeline-progress", daemon=True)
        self._started_at: dict[str, float] = {}
        self._ended_at: dict[str, float] = {}

    def __enter__(self) -> PipelineProgress:
        self.started = time.monotonic()
        # No stdout/stderr redirection by Live: the runner swaps them for the log, and must get its own back.
        self.live = Live(
            self._render([]),
            console=self.console,
            refresh_per_second=4,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.live.update(self._render(self._read()))
        self.live.stop()

    def _read(self) -> list[StepState]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        states = step_states(text, self.steps)
        now = time.monotonic()
        for state in states:
            if state.status != "pending":
                self._started_at.setdefault(state.name, now)
            if state.status in ("done", "failed"):
                self._ended_at.setdefault(state.name, now)
        return states

    def _render(self, states: list[StepState]) -> Group:
        now = time.monotonic()
        took = {name: self._ended_at.get(name, now) - start for name, start in self._started_at.items()}
        return pipeline_view(self.title, states or step_states("", self.steps), now - self.started, took)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.live.update(self._render(self._read()))
