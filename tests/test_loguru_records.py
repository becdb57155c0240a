"""Events as loguru records in the loguru idiom: fields flat in ``record["extra"]`` for the app's own
sinks, filters and formatters, while our own file keeps its flat one-object-per-line JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loguru import logger

from flask_claude.events import CALL_FIELDS, claude_fields

from .conftest import user_msg


def call(app: Any, **kwargs: Any) -> Any:
    params = {"max_tokens": 100, "messages": user_msg("Summarise the plot of Hamlet.")} | kwargs
    with app.app_context():
        return app.extensions["claude"].messages.create(**params)


def test_a_users_serialized_sink_sees_the_fields_flat_in_extra(make_app, tmp_path: Path) -> None:
    app = make_app()
    app_log = tmp_path / "app.log"
    sink = logger.add(str(app_log), serialize=True, level="INFO",
                      filter=lambda record: record["extra"].get("event") == "claude_api_call")
    try:
        message = call(app)
    finally:
        logger.remove(sink)
    [line] = app_log.read_text().splitlines()
    record = json.loads(line)["record"]
    assert record["message"] == "claude_api_call"
    extra = record["extra"]
    assert extra["event"] == "claude_api_call"
    assert extra["feature"] is None and extra["model"] == "claude-opus-4-7"
    assert extra["output_tokens"] == message.usage.output_tokens > 0
    assert isinstance(extra["cost_usd"], float) and extra["cost_usd"] > 0
    assert "claude_fields" not in extra and not any(isinstance(v, dict) for v in extra.values())


def test_the_readmes_routing_filter_and_formatter(make_app, tmp_path: Path) -> None:
    """docs/operations.md's set-up: events to their own serialized file, out of the app's log, a formatter."""
    app = make_app()

    def is_claude(record: Any) -> bool:
        return bool(record["name"] == "flask_claude.events")

    app_lines: list[str] = []
    paid: list[str] = []
    events = tmp_path / "claude-events.log"
    sinks = [
        logger.add(app_lines.append, level="INFO", format="{message}", filter=lambda r: not is_claude(r)),
        logger.add(str(events), serialize=True, level="INFO", filter=is_claude),
        logger.add(paid.append, level="INFO", filter=lambda r: r["extra"].get("event") == "claude_api_call",
                   format="{time:HH:mm:ss} {extra[feature]} {extra[model]} ${extra[cost_usd]:.4f} "
                          "{extra[latency_ms]} ms\n"),
    ]
    try:
        logger.info("an unrelated app line")
        call(app)
    finally:
        for sink in sinks:
            logger.remove(sink)
    assert [line.strip() for line in app_lines] == ["an unrelated app line"]
    [line] = paid
    _, feature, model, cost, latency, unit = line.split()
    assert (feature, model, unit) == ("None", "claude-opus-4-7", "ms") and float(cost[1:]) > 0 and float(latency) >= 0
    [record] = [json.loads(x)["record"] for x in events.read_text().splitlines()]
    assert record["extra"]["event"] == "claude_api_call" and record["message"] == "claude_api_call"


def test_our_own_file_line_is_unchanged_and_excludes_the_apps_context(make_app, tmp_path: Path) -> None:
    """The app's ``contextualize``d fields reach its own sinks, never our line, which keeps its fields and order."""
    app = make_app(CLAUDE_LOG_PATH=str(tmp_path / "ours.jsonl"))
    seen: list[dict[str, Any]] = []
    sink = logger.add(lambda m: seen.append(dict(m.record["extra"])), level="INFO",
                      filter=lambda record: record["extra"].get("event") == "claude_api_call")
    try:
        with logger.contextualize(tenant="acme", feature="shadowed-by-ours"):
            call(app)
    finally:
        logger.remove(sink)
    [ours] = [json.loads(x) for x in (tmp_path / "ours.jsonl").read_text().splitlines()]
    assert sorted(ours) == sorted(CALL_FIELDS)  # exactly our fields: nothing of the app's context
    assert ours["event"] == "claude_api_call" and ours["feature"] is None
    [extra] = seen
    assert extra["tenant"] == "acme" and extra["feature"] is None  # ours wins over the app's context
    assert {k: extra[k] for k in CALL_FIELDS} == ours
    assert extra["claude_sink"] == str(tmp_path / "ours.jsonl")


def test_claude_fields_picks_our_records_only(make_app) -> None:
    app = make_app()
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG")
    try:
        logger.bind(event="claude_api_call", claude_sink="-").info("an app's own look-alike")
        call(app)
    finally:
        logger.remove(sink)
    ours = [fields for r in records if (fields := claude_fields(r)) is not None]
    assert [f["event"] for f in ours] == ["claude_api_call"]


def test_user_and_secrets_are_scrubbed_in_extra_too(make_app) -> None:
    """What the app's sinks see is what our line holds: hashed user, scrubbed strings."""
    app = make_app()
    state = app.extensions["claude"]
    seen: list[dict[str, Any]] = []
    sink = logger.add(lambda m: seen.append(dict(m.record["extra"])), level="DEBUG",
                      filter=lambda record: record["extra"].get("event") == "max_calls_exceeded")
    try:
        state.events.emit("max_calls_exceeded", {"feature": "f", "user": state.events.user("alice@example.com"),
                                                 "detail": "mail bob@example.com"})
    finally:
        logger.remove(sink)
    [extra] = seen
    assert "alice" not in json.dumps(extra, default=str) and extra["detail"] == "mail [email]"
