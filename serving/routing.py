"""Which variant serves a request: a pure function of the account and the traffic policy.

Sticky by account: an account's bucket is a stable hash, and it goes to the challenger when its bucket
is below the challenger's weight. So the same account always gets the same variant under one policy,
and when the weight grows (5 % → 25 %) every account already on the challenger stays there: a
cardholder never flips back and forth between models during a rollout.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

BUCKETS = 10_000
SLOTS = ("a", "b")


def bucket(account_id: str) -> int:
    """Stable across processes and restarts (unlike `hash()`, which Python salts per process)."""
    return zlib.crc32(account_id.encode()) % BUCKETS


def other_slot(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class Route:
    variant: str  # "champion" or "challenger"
    slot: str
    shadow_slot: str | None  # the challenger's slot when it should also score this request in shadow


def route(account_id: str, champion_slot: str, challenger_weight: float, shadow: bool) -> Route:
    challenger_slot = other_slot(champion_slot)
    if bucket(account_id) < round(challenger_weight * BUCKETS):
        return Route("challenger", challenger_slot, None)
    return Route("champion", champion_slot, challenger_slot if shadow else None)
