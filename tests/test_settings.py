"""The settings object: MLOPS_ environment variables, validated at start with one line per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import SettingsError, load_settings


def test_defaults_put_all_state_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.target == "local"
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    for path in (settings.artifact_root, settings.pipeline_root, settings.checkpoint_root, settings.reports_dir):
        assert path.is_relative_to(tmp_path)


def test_environment_overrides_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_TRAIN_WORKERS", "3")
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    settings = load_settings()
    assert settings.train_workers == 3
    assert settings.tracking_uri == "http://127.0.0.1:5000"


def test_every_bad_value_is_reported_at_once_with_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_TRAIN_WORKERS", "0")
    monkeypatch.setenv("MLOPS_TARGET", "mars")
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", "ftp://nope")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "MLOPS_TRAIN_WORKERS" in message and "'0'" in message
    assert "MLOPS_TARGET" in message and "'mars'" in message
    assert "MLOPS_MLFLOW_TRACKING_URI" in message
    assert len(message.splitlines()) == 4  # header + one line per bad value
