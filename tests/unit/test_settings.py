"""Settings come from NAJIMI_* variables and a bad value names its variable."""

from __future__ import annotations

import pytest

from shared.settings import load_settings


def test_defaults_per_service(monkeypatch):
    monkeypatch.delenv("NAJIMI_PORT", raising=False)
    settings = load_settings("profile")
    assert settings.grpc_port == 50051 and settings.effective_metrics_port == 51051
    assert settings.effective_database_url.endswith("profile.db")


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("NAJIMI_PORT", "0")
    monkeypatch.setenv("NAJIMI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NAJIMI_DATABASE_URL", "postgresql://u@127.0.0.1/db")
    settings = load_settings("consent")
    assert settings.grpc_port == 0 and settings.effective_metrics_port == 0
    assert settings.effective_database_url == "postgresql://u@127.0.0.1/db"
    assert settings.effective_token_hashes_file == tmp_path / "token-hashes.json"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NAJIMI_PORT", "seventy"),
        ("NAJIMI_PORT", "70000"),
        ("NAJIMI_DATABASE_URL", "mysql://x"),
        ("NAJIMI_LOG_FORMAT", "xml"),
        ("NAJIMI_GRACE_SECONDS", "-1"),
    ],
)
def test_a_bad_value_stops_with_the_variable_named(monkeypatch, capsys, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        load_settings("consent")
    assert stopped.value.code == 2
    assert variable in capsys.readouterr().err
