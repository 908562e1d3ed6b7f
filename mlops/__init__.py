"""The operator's side, on top of everything: the `mlops` CLI, the local stack, the demo, the traffic simulator,
the timeline and report, and the scenarios (spec, runner, judge, models).

Nothing imports this package except `tests/` and `benchmarks/`; shared code lives in `core/`.
"""

__version__ = "0.1.0"
