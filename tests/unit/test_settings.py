"""Settings: defaults < environment < flags; invalid values fail naming the option."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from gateway.cli import _parser
from gateway.logs import JsonFormatter, RequestIdFilter, request_id_var
from gateway.settings import OPTIONS, Settings, SettingsError, load_settings, local_tokenizer, tokenizer_file


def test_defaults_bind_loopback() -> None:
    settings = load_settings(environ={})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8765
    assert settings.embedded_sim
    assert settings.upstream_url == "http://127.0.0.1:8766"


def test_every_field_has_a_flag_and_env_var() -> None:
    assert set(OPTIONS) == set(Settings.__struct_fields__)


def test_flags_override_env() -> None:
    args = _parser().parse_args(["serve", "--port", "9000", "--engine", "vllm", "--api-key", "a", "--api-key", "b"])
    env = {"PREFIXGATE_PORT": "7000", "PREFIXGATE_ENGINE": "sglang", "PREFIXGATE_STATELESS": "true"}
    settings = load_settings(vars(args), environ=env)
    assert settings.port == 9000
    assert settings.engine == "vllm"
    assert settings.stateless is True
    assert settings.api_key == ("a", "b")


def test_env_lists_and_booleans() -> None:
    settings = load_settings(environ={"PREFIXGATE_API_KEY": "k1, k2", "PREFIXGATE_REORDER": "0"})
    assert settings.api_key == ("k1", "k2")
    assert settings.reorder is False


def test_no_reorder_flag() -> None:
    assert load_settings(vars(_parser().parse_args(["serve", "--no-reorder"])), environ={}).reorder is False


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"PREFIXGATE_PORT": "abc"}, "--port (PREFIXGATE_PORT)"),
        ({"PREFIXGATE_PORT": "70000"}, "--port (PREFIXGATE_PORT)"),
        ({"PREFIXGATE_ENGINE": "tgi"}, "--engine (PREFIXGATE_ENGINE)"),
        ({"PREFIXGATE_UPSTREAM": "localhost:30000"}, "--upstream (PREFIXGATE_UPSTREAM)"),
        ({"PREFIXGATE_READ_TIMEOUT": "0"}, "--read-timeout (PREFIXGATE_READ_TIMEOUT)"),
        ({"PREFIXGATE_STATELESS": "perhaps"}, "--stateless (PREFIXGATE_STATELESS)"),
        ({"PREFIXGATE_MAX_BODY_BYTES": "-5"}, "--max-body-bytes (PREFIXGATE_MAX_BODY_BYTES)"),
        ({"PREFIXGATE_BATCH_SEARCH": "-1"}, "--batch-search (PREFIXGATE_BATCH_SEARCH)"),
        (
            {"PREFIXGATE_API_KEY": "k", "PREFIXGATE_STATE": "redis://r:6379/0"},
            "--namespace-secret (PREFIXGATE_NAMESPACE_SECRET)",
        ),
        ({"PREFIXGATE_NAMESPACE_SECRET": "short"}, "--namespace-secret (PREFIXGATE_NAMESPACE_SECRET)"),
        ({"PREFIXGATE_MAX_EJECTED_PERCENT": "101"}, "--max-ejected-percent (PREFIXGATE_MAX_EJECTED_PERCENT)"),
        ({"PREFIXGATE_STUCK_FACTOR": "-1"}, "--stuck-factor (PREFIXGATE_STUCK_FACTOR)"),
        ({"PREFIXGATE_TOKENIZER": "/no/such/tokenizer.json"}, "--tokenizer (PREFIXGATE_TOKENIZER)"),
    ],
)
def test_invalid_values_name_the_option(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_settings(environ=env)


def test_the_tokenizer_may_be_the_model_directory_that_holds_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"tokenizer\.json"):  # a directory without one
        load_settings(environ={"PREFIXGATE_TOKENIZER": str(tmp_path)})
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_settings(environ={"PREFIXGATE_TOKENIZER": str(tmp_path)}).tokenizer == str(tmp_path)
    assert tokenizer_file(str(tmp_path)) == str(tmp_path / "tokenizer.json")


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        load_settings(environ={}).port = 1  # type: ignore[misc]


def test_redacted_hides_secrets() -> None:
    settings = load_settings(
        environ={}, admin_token="s3cret", upstream_api_key="up", api_key=("client-key",), namespace_secret="n" * 16
    )
    text = json.dumps(settings.redacted())
    for secret in ("s3cret", 'up"', "client-key", "n" * 16):
        assert secret not in text


def test_cli_rejects_bad_value_with_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", "x"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--port (PREFIXGATE_PORT)" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_log_lines_carry_request_id() -> None:
    record = logging.LogRecord("prefixgate", logging.INFO, __file__, 1, "relayed %d bytes", (12,), None)
    token = request_id_var.set("req-abc")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = msgspec.json.decode(JsonFormatter().format(record))
    assert line["request_id"] == "req-abc"
    assert line["message"] == "relayed 12 bytes"
    assert line["level"] == "info"


@pytest.mark.parametrize(
    ("env", "module", "extra"),
    [
        ({"PREFIXGATE_STATE": "redis://127.0.0.1:6379"}, "redis", "state"),
        ({"PREFIXGATE_KV_EVENTS_ENDPOINT": "tcp://127.0.0.1:5557"}, "zmq", "events"),
    ],
)
def test_optional_features_name_their_extra_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], module: str, extra: str
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(SettingsError, match=rf"prefixgate\[{extra}\]"):
        load_settings({}, env)
    monkeypatch.undo()
    assert load_settings({}, env)  # installed here (the dev extra pulls both in)


def test_the_simulated_engine_is_chosen_explicitly() -> None:
    assert load_settings(environ={}).upstream == ("sim://",)
    assert load_settings(environ={}).embedded_sim
    assert load_settings(environ={"PREFIXGATE_UPSTREAM": ""}).embedded_sim  # an empty list is an unset one
    assert not load_settings(environ={"PREFIXGATE_UPSTREAM": "http://a:1"}).embedded_sim
    with pytest.raises(SettingsError, match="cannot be one of several"):
        load_settings(environ={"PREFIXGATE_UPSTREAM": "sim://,http://a:1"})
    with pytest.raises(SettingsError, match="give an engine's URL"):
        load_settings(upstream=())


def test_help_groups_every_option_by_feature() -> None:
    parser = _parser()
    serve = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["serve"]  # type: ignore[union-attr]
    titles = {group.title: {a.dest for a in group._group_actions} for group in serve._action_groups}
    grouped = {
        name for group, names in titles.items() if group not in ("options", "positional arguments") for name in names
    }
    assert grouped == set(OPTIONS)
    assert {OPTIONS[name].group for name in OPTIONS} <= set(titles)


def test_local_tokenizer_finds_a_model_directory_or_file_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    assert local_tokenizer(str(tmp_path)) == str(tmp_path)
    assert local_tokenizer(str(tmp_path / "tokenizer.json")) == str(tmp_path / "tokenizer.json")
    assert local_tokenizer(str(tmp_path / "elsewhere")) is None  # a path on the engine's host only
    assert local_tokenizer("served-name") is None and local_tokenizer("org/not-cached-here") is None
    assert load_settings(environ={"PREFIXGATE_TOKENIZER": "auto"}).tokenizer == "auto"
