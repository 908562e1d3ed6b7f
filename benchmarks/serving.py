"""Serving benchmark: bare Starlette ceiling vs slot vs gateway→slot vs gateway with 100 % shadow.

Load comes from wrk (Debian package) in its own process, on loopback, at a fixed concurrency; every
server is a real process started the way users start it (`mlops serve ...`). One invocation measures
all four cases side by side. With --json the last stdout line is one JSON object.

    .venv/bin/python benchmarks/serving.py --json [--duration 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.processes import ManagedProcess, free_port, start_process, stop_process, wait_until_ready  # noqa: E402
from core.schema import FEATURES  # noqa: E402
from core.synthetic import generate_transactions  # noqa: E402
from mlops.local_stack import LocalStack  # noqa: E402

TARGETS = {"slot_vs_bare": 0.25, "gateway_vs_slot": 0.5, "gateway_added_p50_ms": 1.5, "shadow_p99_increase": 0.20}


def lua_script(path: Path, endpoint: str, rows: int = 500) -> Path:
    frame = generate_transactions(rows, seed=5)
    bodies = [
        json.dumps({"account_id": r["account_id"], **{k: r[k] for k in FEATURES}}, default=float)
        for r in frame.to_dict(orient="records")
    ]
    table = ",\n".join("[[" + body + "]]" for body in bodies)
    path.write_text(
        f"local bodies = {{\n{table}\n}}\nlocal n = #bodies\nlocal i = 0\n"
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'request = function()\n  i = i % n + 1\n  return wrk.format(nil, "{endpoint}", nil, bodies[i])\nend\n'
    )
    return path


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value.strip()).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    percentile = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket.groups())) if socket else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": round(rps, 1),
        "p50_ms": round(_ms(percentile["50"]), 3),
        "p99_ms": round(_ms(percentile["99"]), 3),
        "errors": errors,
    }


def shadow_counts(gateway: str) -> dict[str, float]:
    """Shadow work done vs shed during the run, from the gateway's own Prometheus metrics."""
    import httpx

    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    done = sum(float(v) for v in re.findall(r'^gateway_shadow_requests_total\{status="ok"\} (\S+)$', text, re.M))
    dropped = sum(float(v) for v in re.findall(r"^gateway_shadow_dropped_total (\S+)$", text, re.M))
    return {"shadow_completed": done, "shadow_dropped": dropped}


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ensure_wrk()
    from core.settings import Settings
    from tests.support import register_model

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        stack = LocalStack(root / "home", token="bench-token")
        settings = Settings(home=root / "home")
        versions = [register_model(settings, root, seed) for seed in (0, 1)]
        model_dir = root / "m0"
        predict = lua_script(root / "predict.lua", "/v1/predict")
        score = lua_script(root / "score.lua", "/v1/score")
        bare_port = free_port()
        bare = start_process(
            "bare",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.bare_app:app",
                "--port",
                str(bare_port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            {**stack.env, "MLOPS_BENCH_MODEL_DIR": str(model_dir)},
            root / "logs",
            cwd=REPO,
        )
        rounds: dict[str, list[dict[str, Any]]] = {"bare": [], "slot": [], "gateway": [], "gateway_shadow": []}
        try:
            _wait_port(bare_port, bare)
            stack.start()
            stack.cli("slot", "assign", "a", versions[0])
            stack.cli("slot", "assign", "b", versions[1])
            wait_until_ready(None, stack.url("slot-a") + "/readyz")
            wait_until_ready(None, stack.url("slot-b") + "/readyz")
            wait_until_ready(None, stack.url("gateway") + "/readyz")
            # Interleaved rounds, medians reported: a 2-core machine's background noise then hits every
            # case alike instead of whichever case happened to run during it.
            for _ in range(args.rounds):
                rounds["bare"].append(
                    run_wrk(f"http://127.0.0.1:{bare_port}", predict, args.duration, args.connections)
                )
                rounds["slot"].append(run_wrk(stack.url("slot-a"), predict, args.duration, args.connections))
                stack.cli("policy", "set", "--challenger-weight", "0", "--champion-slot", "a", "--reason", "bench")
                time.sleep(1.0)
                rounds["gateway"].append(run_wrk(stack.url("gateway"), score, args.duration, args.connections))
                stack.cli(
                    "policy",
                    "set",
                    "--challenger-weight",
                    "0",
                    "--champion-slot",
                    "a",
                    "--shadow",
                    "--reason",
                    "bench shadow",
                )
                time.sleep(1.0)
                before = shadow_counts(stack.url("gateway"))
                shadow = run_wrk(stack.url("gateway"), score, args.duration, args.connections)
                after = shadow_counts(stack.url("gateway"))
                rounds["gateway_shadow"].append({**shadow, **{k: after[k] - before[k] for k in after}})
        finally:
            stop_process(bare)
            stack.stop()
        cases = {name: _median(results) for name, results in rounds.items()}
    ratios = {
        "slot_vs_bare": round(cases["slot"]["rps"] / cases["bare"]["rps"], 3),
        "gateway_vs_slot": round(cases["gateway"]["rps"] / cases["slot"]["rps"], 3),
        "gateway_added_p50_ms": round(cases["gateway"]["p50_ms"] - cases["slot"]["p50_ms"], 3),
        "shadow_p99_increase": round(cases["gateway_shadow"]["p99_ms"] / cases["gateway"]["p99_ms"] - 1, 3),
    }
    meets = {
        "slot_vs_bare": ratios["slot_vs_bare"] >= TARGETS["slot_vs_bare"],
        "gateway_vs_slot": ratios["gateway_vs_slot"] >= TARGETS["gateway_vs_slot"],
        "gateway_added_p50_ms": ratios["gateway_added_p50_ms"] <= TARGETS["gateway_added_p50_ms"],
        "shadow_p99_increase": ratios["shadow_p99_increase"] <= TARGETS["shadow_p99_increase"],
        "shadow_zero_errors": cases["gateway_shadow"]["errors"] == 0,
    }
    report = {
        "benchmark": "serving",
        "connections": args.connections,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "cases": cases,
        "ratios": ratios,
        "targets": TARGETS,
        "meets": meets,
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0 if all(meets.values()) else 1


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    keys = results[0].keys()
    return {k: statistics.median(r[k] for r in results) if k != "errors" else sum(r[k] for r in results) for k in keys}


def _wait_port(port: int, managed: ManagedProcess, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert managed.alive(), managed.log_tail()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port}")


if __name__ == "__main__":
    sys.exit(main())
