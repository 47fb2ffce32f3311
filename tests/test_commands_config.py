"""One setting, one meaning across services; `ectrans config` prints what each service would use."""

from __future__ import annotations

import json

import pytest

from ectrans import cli
from ectrans.commands.config import SERVICES
from ectrans.common.settings import CommonSettings


def test_a_setting_shared_by_services_has_one_default() -> None:
    """A `.env` line reaches every service: a name two services read must mean the same to both."""
    seen: dict[str, tuple[str, object]] = {}
    for service, settings_class in SERVICES.items():
        for name, field in settings_class.model_fields.items():
            if name in CommonSettings.model_fields or name == "instance":  # instance: each service's own name
                continue
            if name in seen:
                other, default = seen[name]
                assert field.default == default, (
                    f"ECTRANS_{name.upper()}: {other} {default!r}, {service} {field.default!r}"
                )
            seen[name] = (service, field.default)
    assert "max_deliveries" in CommonSettings.model_fields


def test_config_prints_effective_settings_and_sources(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("no-dotenv"))
    monkeypatch.setenv("ECTRANS_MAX_DELIVERIES", "4")
    monkeypatch.setenv("ECTRANS_REDIS_URL", "redis://user:secret@db:6379/0")
    assert cli.main(["config", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"common", *SERVICES}
    assert report["common"]["max_deliveries"] == {"value": 4, "source": "env"}
    assert "secret" not in report["common"]["redis_url"]["value"]
    assert report["worker"]["rt_max_batch"] == {"value": 8, "source": "default"}
    assert "max_deliveries" not in report["dispatcher"]  # shown once, under common


def test_config_reports_an_invalid_value(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ECTRANS_RT_MAX_BATCH", "0")
    assert cli.main(["config"]) == 1
    assert "rt_max_batch" in capsys.readouterr().out


def test_config_never_prints_a_secret(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ECTRANS_GATEWAY_API_KEYS", '["sk-one-secret", "sk-two-secret"]')
    monkeypatch.setenv("ECTRANS_REDIS_URL", "redis://user:hunter2-secret@127.0.0.1:7/0")
    assert cli.main(["config", "--json"]) == 0
    shown = capsys.readouterr().out
    assert "secret" not in shown
    report = json.loads(shown)
    assert report["gateway"]["gateway_api_keys"]["value"] == "<2 set>"
