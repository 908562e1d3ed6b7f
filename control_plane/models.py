"""Plain values shared by the store, the API and the clients (no database or HTTP imports, so the gateway and
the slots can use them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SLOTS: tuple[str, ...] = ("a", "b")


@dataclass(frozen=True)
class TrafficPolicy:
    generation: int
    weights: dict[str, float]
    shadow: bool
    champion_slot: str
    reason: str
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "weights": dict(self.weights),
            "shadow": self.shadow,
            "champion_slot": self.champion_slot,
            "reason": self.reason,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class SlotAssignment:
    slot: str
    model_version: str | None
    generation: int
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "model_version": self.model_version,
            "generation": self.generation,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Generations:
    """Current generation of every resource: one cheap query that long-poll watchers repeat."""

    policy: int
    slots: dict[str, int]


DEFAULT_POLICY = TrafficPolicy(
    generation=0,
    weights={"a": 1.0, "b": 0.0},
    shadow=False,
    champion_slot="a",
    reason="default: nothing written yet",
    updated_at=0.0,
)
