"""Configuration fails at startup, naming the key, and never switches the simulator on by itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from flask_claude import Claude, ClaudeGuardError, ConfigError
from flask_claude.settings import SETTING_KEYS


def init(**config: object) -> Flask:
    app = Flask("settings_test")
    app.config.update(config)
    Claude(app)
    return app


@pytest.mark.parametrize(("key", "value"), [
    ("CLAUDE_MAX_TOKENS_CAP", "lots"),
    ("CLAUDE_MAX_TOKENS_CAP", 0),
    ("CLAUDE_MAX_RETRIES", -1),
    ("CLAUDE_MAX_RETRIES", 2.5),
    ("CLAUDE_DEADLINE", 0),
    ("CLAUDE_RETRY_AFTER_CAP", [1]),
    ("CLAUDE_MODELS", []),
    ("CLAUDE_MODELS", [3]),
    ("CLAUDE_FALLBACK_ON_RATE_LIMIT", "maybe"),
    ("CLAUDE_STORAGE_URI", "localhost:6379"),
    ("CLAUDE_STORAGE_FAILURE", "sometimes"),
    ("CLAUDE_PRICES", {"claude-new-9": {"input": 1}}),
    ("CLAUDE_PRICES", {"claude-haiku-4-5": {"input": -1}}),
    ("CLAUDE_BUDGET_ALERTS", [0.5, 2]),
    ("CLAUDE_BUDGET_TIMEZONE", "Mars/Olympus"),
    ("CLAUDE_FLAGS", "yaml"),
    ("CLAUDE_BREAKER", {"failure_rate": 1.5}),
    ("CLAUDE_BREAKER", {"failure_rte": 0.5}),  # a member that does not exist
    ("CLAUDE_OPS_ALERTS", {"window": 30}),
    ("CLAUDE_ROLLUP_FLUSH_INTERVAL", -1),
    ("CLAUDE_ROLLUP_FLUSH_INTERVAL", 61),
    ("CLAUDE_ROLLUP_FLUSH_INTERVAL", "soon"),
    ("CLAUDE_STORAGE_URI", "postgresql://localhost/app"),  # not a store this extension speaks
    ("CLAUDE_STORAGE_OPTIONS", ["ssl_ca_certs"]),
    ("CLAUDE_STORAGE_OPTIONS", {"not an argument": 1}),
])
def test_wrong_value_fails_at_init_with_the_key_name(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        init(CLAUDE_SIMULATE=True, **{key: value})
    assert key in str(info.value)


def test_unknown_claude_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="CLAUDE_DAILY_BUGDET_USD"):
        init(CLAUDE_SIMULATE=True, CLAUDE_DAILY_BUGDET_USD=5)


def test_missing_key_without_simulate_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigError) as info:
        init()
    message = str(info.value)
    assert "ANTHROPIC_API_KEY" in message and "CLAUDE_SIMULATE" in message


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env-123456789")
    app = init()
    assert app.extensions["claude"].settings.api_key == "sk-ant-from-env-123456789"
    assert app.extensions["claude"].simulator is None


def test_unpriced_model_in_chain_fails_at_startup_with_known_ids() -> None:
    with pytest.raises(ConfigError) as info:
        init(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-opus-4-7", "claude-opus-9"])
    assert "claude-opus-9" in str(info.value) and "claude-sonnet-4-6" in str(info.value)


def test_constructor_overrides_and_string_forms() -> None:
    app = Flask("overrides")
    app.config.update(CLAUDE_SIMULATE="true", CLAUDE_MODELS="claude-haiku-4-5, claude-sonnet-4-6")
    Claude(app, max_retries=1)
    settings = app.extensions["claude"].settings
    assert settings.simulate is True and settings.max_retries == 1
    assert settings.models == ("claude-haiku-4-5", "claude-sonnet-4-6")


def test_unknown_constructor_argument() -> None:
    with pytest.raises(ConfigError, match="max_retry"):
        Claude(Flask("x"), max_retry=3)


def test_two_apps_from_one_extension_keep_their_settings() -> None:
    claude = Claude()
    apps = []
    for cap in (100, 200):
        app = Flask(f"factory_{cap}")
        app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MAX_TOKENS_CAP=cap)
        claude.init_app(app)
        apps.append(app)
    for app, cap in zip(apps, (100, 200), strict=True):
        with app.app_context():
            assert claude.settings.max_tokens_cap == cap
    with pytest.raises(RuntimeError, match="app context"):
        _ = claude.messages


# --- the reference page documents every setting and every degradation reason -----------------------

REPO = Path(__file__).resolve().parent.parent


def _section_rows(text: str, heading: str) -> list[str]:
    """The first cells of the Markdown table rows of one ``##`` section."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1].strip() for line in section.splitlines()
            if line.startswith("| `")]


def test_reference_lists_every_setting_and_the_readme_links_it() -> None:
    reference = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = {cell.strip("`") for cell in _section_rows(reference, "Settings")}
    assert documented == set(SETTING_KEYS)  # a new setting needs its row; a removed one loses it
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "docs/reference.md#settings" in readme and "docs/reference.md#log-events" in readme


def test_reference_lists_every_degradation_reason() -> None:
    reference = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = {reason.strip(" `") for cell in _section_rows(reference, "Degradation reasons")
                  for reason in cell.split(",")}
    reasons = {cls.reason for cls in _subclasses(ClaudeGuardError)}
    assert reasons <= documented, sorted(reasons - documented)


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_a_redis_uri_without_the_redis_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a))
    with pytest.raises(ConfigError, match=r"CLAUDE_STORAGE_URI.*flask-claude\[redis\]"):
        init(CLAUDE_SIMULATE=True, CLAUDE_STORAGE_URI="redis://localhost:6379")


def test_the_spin_setting_is_deprecated_not_refused() -> None:
    with pytest.warns(DeprecationWarning, match="CLAUDE_STORAGE_SPIN"):
        app = init(CLAUDE_SIMULATE=True, CLAUDE_STORAGE_SPIN=0.0005)
    assert not hasattr(app.extensions["claude"].settings, "storage_spin")


def test_storage_options_reach_the_redis_client(redis_url: str) -> None:
    app = init(CLAUDE_SIMULATE=True, CLAUDE_STORAGE_URI=redis_url,
               CLAUDE_STORAGE_OPTIONS={"health_check_interval": 7, "max_connections": 321})
    pool = app.extensions["claude"].store.inner.client.connection_pool
    assert pool.connection_kwargs["health_check_interval"] == 7 and pool.max_connections == 321


def test_grouped_settings_and_their_old_flat_names() -> None:
    app = init(CLAUDE_SIMULATE=True, CLAUDE_BREAKER={"min_calls": 3, "cooldown": 5},
               CLAUDE_OPS_ALERTS={"error_rate": 0.02, "window": None})
    settings = app.extensions["claude"].settings
    assert (settings.breaker_min_calls, settings.breaker_cooldown, settings.breaker_window) == (3, 5.0, 30.0)
    assert settings.alert_error_rate == 0.02 and settings.alert_window is None
    with pytest.warns(DeprecationWarning, match=r"CLAUDE_BREAKER_MIN_CALLS is deprecated: set CLAUDE_BREAKER"):
        old = init(CLAUDE_SIMULATE=True, CLAUDE_BREAKER_MIN_CALLS=7, CLAUDE_ALERT_ERROR_RATE=0.1)
    assert old.extensions["claude"].settings.breaker_min_calls == 7
    assert old.extensions["claude"].settings.alert_error_rate == 0.1
    app = Flask("grouped_override")
    app.config.update(CLAUDE_SIMULATE=True)
    Claude(app, breaker={"failure_rate": 0.9})
    assert app.extensions["claude"].settings.breaker_failure_rate == 0.9
