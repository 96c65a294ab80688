"""Bad settings and bad model configs stop start-up with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurestore.schema import ModelConfigError, load_model_config
from freshrec.cli import main
from freshrec.settings import (
    SettingsError,
    default_model_config_path,
    load_settings,
    redact_url,
)


def test_defaults_point_at_the_embedded_stack() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap.startswith("127.0.0.1:")
    assert settings.redis_url.startswith("redis://127.0.0.1:")
    assert load_model_config(default_model_config_path()).name == "movielens"


def test_env_overrides_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_TRAINER_BATCH_MAX_EVENTS", "512")
    assert load_settings().trainer_batch_max_events == 512


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_TRAINER_BATCH_MAX_EVENTS", "-3")
    with pytest.raises(SettingsError, match=r"^FRESHREC_TRAINER_BATCH_MAX_EVENTS: .*-3"):
        load_settings()


def test_unknown_env_variable_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_KAFKA_BOOTSTRAPS", "x:1")
    with pytest.raises(SettingsError, match="FRESHREC_KAFKA_BOOTSTRAPS: not a freshrec setting"):
        load_settings()


def test_cli_prints_one_line_for_a_bad_env_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FRESHREC_REDIS_URL", "localhost:6379")
    with pytest.raises(SystemExit) as exc:
        main(["replay", "synthetic", "--events", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("freshrec: FRESHREC_REDIS_URL:")


def test_cli_prints_one_line_for_a_bad_model_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.toml"
    bad.write_text(default_model_config_path().read_text().replace("\ndim = 8", "\ndim = 0", 1))
    monkeypatch.setenv("FRESHREC_MODEL_CONFIG_PATH", str(bad))
    with pytest.raises(SystemExit) as exc:
        main(["replay", "synthetic", "--events", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "slots.0.dim" in err[0] and "greater than or equal to 1" in err[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('kind = "bucketized"\nboundaries = [18, 25, 35, 45, 50, 56]',
                             'kind = "bucketized"'), "need 'boundaries'"),
        (lambda t: t.replace('name = "gender"', 'name = "user"'), "duplicate slot names"),
        (lambda t: t.replace('kind = "multi_valued"', 'kind = "multi"'), "slots.6.kind"),
        (lambda t: t + "\n[[slots]\n", "not valid TOML"),
        (lambda t: t.replace('source = "item_id"', 'source = "movie"'), "item_id"),
    ],
)
def test_model_config_errors_name_the_key(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "model.toml"
    path.write_text(edit(default_model_config_path().read_text()))
    with pytest.raises(ModelConfigError, match=message) as exc:
        load_model_config(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cr%40t@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://app:s3cr%40t@[::1]:6380/2", "rediss://app:***@[::1]:6380/2"),
    ("redis://user@redis:6379", "redis://user@redis:6379"),
    ("redis://:s3cr%40t@redis:port/0", "redis://***"),
])
def test_redis_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cr" not in redact_url(url)


def test_secrets_never_show_in_settings_errors_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_REDIS_URL", "http://:hunter2-secret@redis:6379/0")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert "FRESHREC_REDIS_URL" in str(exc.value) and "hunter2" not in str(exc.value)
    monkeypatch.delenv("FRESHREC_REDIS_URL")
    monkeypatch.setenv("FRESHREC_SERVICE_API_TOKEN", "short")  # tokens need 12+ characters
    with pytest.raises(SettingsError, match="FRESHREC_SERVICE_API_TOKEN") as exc:
        load_settings()
    assert "short" not in str(exc.value)
    monkeypatch.setenv("FRESHREC_SERVICE_API_TOKEN", "t" * 24)
    monkeypatch.setenv("FRESHREC_REDIS_URL", "redis://:hunter2-secret@redis:6379/0")
    settings = load_settings()
    assert settings.service_api_token == "t" * 24
    assert "t" * 24 not in repr(settings) and "hunter2" not in repr(settings)


def test_events_auth_and_future_skew_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().service_events_auth == "token"  # closed by default
    assert load_settings().event_max_future_skew_s == 300.0
    monkeypatch.setenv("FRESHREC_SERVICE_EVENTS_AUTH", "off")
    with pytest.raises(SettingsError, match="FRESHREC_SERVICE_EVENTS_AUTH"):
        load_settings()
    monkeypatch.setenv("FRESHREC_SERVICE_EVENTS_AUTH", "none")
    monkeypatch.setenv("FRESHREC_EVENT_MAX_FUTURE_SKEW_S", "-1")
    with pytest.raises(SettingsError, match="FRESHREC_EVENT_MAX_FUTURE_SKEW_S"):
        load_settings()
