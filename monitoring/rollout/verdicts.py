"""The one verdict type and the one rule that combines verdicts, shared by the guardrails and the state machine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Verdict = Literal["pass", "fail", "inconclusive"]
VERDICTS: frozenset[str] = frozenset({"pass", "fail", "inconclusive"})


def combine_verdicts(verdicts: Iterable[Verdict]) -> Verdict:
    """fail if any verdict is fail; pass if all pass and there is at least one; else inconclusive.

    An empty set is inconclusive, never pass: no guardrail evaluated means no evidence."""
    seen = list(verdicts)
    if "fail" in seen:
        return "fail"
    return "pass" if seen and all(v == "pass" for v in seen) else "inconclusive"
