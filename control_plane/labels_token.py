"""The labels token: the credential of label writers (`POST /v1/feedback` on the gateway).

Labels are evidence for an automatic decision, so writing them needs a credential, and not the operators'
one: label writers (the chargeback feed, the traffic simulator) are another system. It is resolved the way
the control-plane token is: `MLOPS_LABELS_TOKEN` when set, else a private file under MLOPS_HOME
(`labels.token`, mode 0600), created on first use and shared by every local process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from control_plane.tokens import configured_or_file_token

LABELS_TOKEN_FILE_NAME = "labels.token"


class _LabelsTokenSettings(Protocol):
    labels_token: str
    home: Path


def labels_token_path(settings: _LabelsTokenSettings) -> Path:
    return settings.home / LABELS_TOKEN_FILE_NAME


def resolve_labels_token(settings: _LabelsTokenSettings) -> str:
    """`MLOPS_LABELS_TOKEN` when set, else the token in `home/labels.token`, created on first use."""
    return configured_or_file_token(settings.labels_token, labels_token_path(settings))


def labels_headers(settings: _LabelsTokenSettings) -> dict[str, str]:
    """What a label writer sends with each label."""
    return {"Authorization": f"Bearer {resolve_labels_token(settings)}"}
