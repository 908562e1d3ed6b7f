"""The one bearer-token check that the control plane, the controller and the slot all use."""

from __future__ import annotations

import pytest

from control_plane.tokens import check_bearer


def test_the_right_bearer_token_is_accepted_whatever_the_scheme_case() -> None:
    assert check_bearer("Bearer s3cret", "s3cret") is None
    assert check_bearer("bearer  s3cret ", "s3cret") is None


@pytest.mark.parametrize("header", [None, "", "   ", "Basic dXNlcjpwYXNz", "Bearer", "s3cret"])
def test_no_bearer_credential_is_401_with_a_challenge(header: str | None) -> None:
    rejected = check_bearer(header, "s3cret")
    assert rejected is not None and rejected.status == 401
    assert rejected.headers == {"WWW-Authenticate": "Bearer"}


def test_a_wrong_token_is_403_and_names_no_token() -> None:
    rejected = check_bearer("Bearer s3cre", "s3cret")
    assert rejected is not None and rejected.status == 403
    assert "s3cre" not in rejected.message


def test_every_service_uses_the_one_check() -> None:
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for module in ("control_plane/app.py", "monitoring/rollout/service.py", "serving/slot.py"):
        source = (repo / module).read_text()
        assert "check_bearer(" in source and "compare_digest" not in source, module
