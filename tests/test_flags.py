"""Flag providers, on the real LaunchDarkly SDK (TestData, file data source, an unreachable loopback port)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ldclient import LDClient
from ldclient.config import Config
from ldclient.integrations.test_data import TestData
from loguru import logger

from flask_claude.errors import ConfigError
from flask_claude.flags import (
    EnvFlags,
    LaunchDarklyFlags,
    StaticFlags,
    UserContext,
    flag_name,
    make_provider,
)

from .conftest import wait_for

ALICE = UserContext("alice", {"plan": "pro"})
BOB = UserContext("bob", {"plan": "free"})


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """Warnings flags.py logged through loguru (caplog cannot see loguru)."""
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m).rstrip("\n")), level="WARNING", format="{message}",
                      filter="flask_claude.flags")
    yield messages
    logger.remove(sink)


@pytest.fixture
def td() -> TestData:
    data = TestData.data_source()
    data.update(data.flag("ai-summarize").variation_for_all(True))
    return data


@pytest.fixture
def td_client(td: TestData) -> Iterator[LDClient]:
    client = LDClient(Config("any-key", update_processor_class=td, send_events=False, diagnostic_opt_out=True),
                      start_wait=0)
    yield client
    client.close()


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- LaunchDarkly (TestData) -------------------------------------------------------------------------


def test_launchdarkly_toggle_is_seen_by_the_next_evaluation(td: TestData, td_client: LDClient) -> None:
    flags = LaunchDarklyFlags(td_client)
    assert flags.enabled("ai-summarize", ALICE, False) is True
    td.update(td.flag("ai-summarize").variation_for_all(False))
    assert flags.enabled("ai-summarize", ALICE, True) is False
    td.update(td.flag("ai-summarize").variation_for_all(True))
    assert flags.enabled("ai-summarize", ALICE, False) is True
    assert flags.enabled("ai-unknown", ALICE, True) is True  # flag not found -> default
    assert flags.enabled("ai-unknown", ALICE, False) is False


def test_launchdarkly_targets_by_attribute(td: TestData, td_client: LDClient) -> None:
    td.update(td.flag("ai-summarize").variation_for_all(False).if_match("plan", "pro").then_return(True))
    flags = LaunchDarklyFlags(td_client)
    assert flags.enabled("ai-summarize", ALICE, False) is True
    assert flags.enabled("ai-summarize", BOB, True) is False
    assert flags.enabled("ai-summarize", None, True) is False  # anonymous: a valid context, no plan


def test_launchdarkly_string_value_for_model_rollout(td: TestData, td_client: LDClient) -> None:
    td.update(td.flag("ai-model").variations("claude-sonnet-4-5", "claude-opus-4-1").fallthrough_variation(0)
              .if_match("plan", "pro").then_return(1))
    flags = LaunchDarklyFlags(td_client)
    assert flags.value("ai-model", ALICE, None) == "claude-opus-4-1"
    assert flags.value("ai-model", BOB, None) == "claude-sonnet-4-5"
    assert flags.value("ai-missing", BOB, "fallback") == "fallback"


def test_launchdarkly_non_bool_in_enabled_gives_default_and_warns_once(
        td: TestData, td_client: LDClient, warnings: list[str]) -> None:
    td.update(td.flag("ai-summarize").value_for_all("yes please"))
    flags = LaunchDarklyFlags(td_client)
    assert [flags.enabled("ai-summarize", ALICE, True) for _ in range(5)] == [True] * 5
    assert [flags.enabled("ai-summarize", ALICE, False) for _ in range(5)] == [False] * 5
    assert len(warnings) == 1 and "ai-summarize" in warnings[0]


def test_launchdarkly_context_keeps_identity_and_marks_anonymous() -> None:
    anonymous = LaunchDarklyFlags.context(UserContext(None))
    assert anonymous.valid and anonymous.anonymous and anonymous.key == "anonymous"
    assert LaunchDarklyFlags.context(UserContext("")).anonymous
    ctx = LaunchDarklyFlags.context(UserContext("u1", {"plan": "pro", "key": "evil", "kind": "org"}))
    assert ctx.valid and ctx.key == "u1" and ctx.kind == "user" and ctx.get("plan") == "pro"
    assert not ctx.anonymous


def test_launchdarkly_flag_file_reloads_live(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"

    def write(values: dict[str, Any]) -> None:
        # Atomic replace, as an editor would: a poll must never catch a half-written file.
        old_mtime = path.stat().st_mtime_ns if path.exists() else 0
        tmp = tmp_path / "flags.json.tmp"
        tmp.write_text(json.dumps({"flagValues": values}))
        os.replace(tmp, path)
        # The SDK notices changes by mtime; make sure it moves even on a coarse-grained filesystem.
        if path.stat().st_mtime_ns <= old_mtime:
            os.utime(path, ns=(old_mtime + 1_000_000_000, old_mtime + 1_000_000_000))

    write({"ai-summarize": True, "ai-model": "claude-sonnet-4-5"})
    flags = LaunchDarklyFlags.from_file(path)
    try:
        assert flags.enabled("ai-summarize", ALICE, False) is True
        assert flags.value("ai-model", ALICE, None) == "claude-sonnet-4-5"
        write({"ai-summarize": False, "ai-model": "claude-opus-4-1"})
        assert wait_for(lambda: flags.enabled("ai-summarize", ALICE, True) is False)
        assert flags.value("ai-model", ALICE, None) == "claude-opus-4-1"
    finally:
        flags.close()


def test_launchdarkly_unreachable_returns_defaults_and_warns_once(warnings: list[str]) -> None:
    port = free_loopback_port()  # closed again: every connection is refused, nothing leaves the machine
    local = f"http://127.0.0.1:{port}"

    def config() -> Config:
        return Config("sdk-test", base_uri=local, stream_uri=local, events_uri=local, diagnostic_opt_out=True)

    flags = LaunchDarklyFlags(sdk_key="sdk-test", start_wait=0.5, config_factory=config)
    try:
        started = time.monotonic()
        first = flags.enabled("ai-summarize", ALICE, True)
        assert time.monotonic() - started < 0.5 + 1.5
        results = [first] + [flags.enabled("ai-summarize", BOB, True) for _ in range(9)]
        results += [flags.value("ai-model", ALICE, "default-model") for _ in range(10)]
        assert results == [True] * 10 + ["default-model"] * 10
        assert flags.enabled("ai-summarize", ALICE, False) is False
        assert len(warnings) == 1, warnings
        assert "sdk-test" not in warnings[0]
    finally:
        flags.close()


def test_launchdarkly_builds_owned_client_lazily_and_rebuilds_after_fork(td: TestData) -> None:
    pid = [1000]
    built: list[Config] = []

    def config() -> Config:
        built.append(Config("any-key", update_processor_class=td, send_events=False, diagnostic_opt_out=True))
        return built[-1]

    flags = LaunchDarklyFlags(config_factory=config, start_wait=0, getpid=lambda: pid[0])
    assert built == []  # nothing is started in a preloading master until a flag is needed
    assert flags.enabled("ai-summarize", ALICE, False) is True
    assert flags.enabled("ai-summarize", ALICE, False) is True
    assert len(built) == 1
    pid[0] = 1001  # a forked worker
    td.update(td.flag("ai-summarize").variation_for_all(False))
    assert flags.enabled("ai-summarize", ALICE, True) is False
    assert len(built) == 2
    flags.close()


def test_launchdarkly_handed_in_client_gets_postfork(td: TestData, td_client: LDClient,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pid = [1000]
    calls: list[float] = []
    real_postfork = td_client.postfork

    def postfork(start_wait: float = 5) -> None:
        calls.append(start_wait)
        real_postfork(start_wait=start_wait)

    monkeypatch.setattr(td_client, "postfork", postfork)
    flags = LaunchDarklyFlags(td_client, start_wait=0.25, getpid=lambda: pid[0])
    assert flags.enabled("ai-summarize", ALICE, False) is True
    assert calls == []
    pid[0] = 1001
    td.update(td.flag("ai-summarize").variation_for_all(False))
    assert flags.enabled("ai-summarize", ALICE, True) is False
    assert flags.enabled("ai-summarize", ALICE, True) is False
    assert calls == [0.25]  # once per new process, not per evaluation
    flags.close()  # a handed-in client stays open: it belongs to the caller
    assert flags.enabled("ai-summarize", ALICE, True) is False


def test_launchdarkly_works_in_a_real_forked_child(td: TestData, td_client: LDClient) -> None:
    flags = LaunchDarklyFlags(td_client, start_wait=1.0)
    assert flags.enabled("ai-summarize", ALICE, False) is True
    td.update(td.flag("ai-summarize").variation_for_all(False))  # before the fork: the child has a copy
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            result = flags.enabled("ai-summarize", ALICE, True)
            owner_ok = td_client._owner_pid == os.getpid()  # postfork() re-initialised the client here
            os.write(write_end, json.dumps([result, owner_ok]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(child, 9)
        os.waitpid(child, 0)
        pytest.fail("forked child did not finish")
    with os.fdopen(read_end, "rb") as pipe:
        assert json.loads(pipe.read()) == [False, True]
    assert status == 0
    assert flags.enabled("ai-summarize", ALICE, True) is False  # the parent is untouched


def test_launchdarkly_needs_a_source() -> None:
    with pytest.raises(ConfigError):
        LaunchDarklyFlags()
    with pytest.raises(ConfigError):
        LaunchDarklyFlags(object(), sdk_key="k")  # type: ignore[arg-type]


# -- environment -------------------------------------------------------------------------------------


def test_env_flag_acts_on_the_next_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAUDE_FLAG_AI_SUMMARIZE", raising=False)
    flags = EnvFlags()
    assert flags.enabled("ai-summarize", None, True) is True
    monkeypatch.setenv("CLAUDE_FLAG_AI_SUMMARIZE", "off")
    assert flags.enabled("ai-summarize", None, True) is False
    monkeypatch.setenv("CLAUDE_FLAG_AI_SUMMARIZE", "YES")
    assert flags.enabled("ai-summarize", None, False) is True
    monkeypatch.setenv("CLAUDE_FLAG_AI_SUMMARIZE", "maybe")
    assert flags.enabled("ai-summarize", None, False) is False
    assert EnvFlags.variable("ai-summarize.v2") == "CLAUDE_FLAG_AI_SUMMARIZE_V2"


@pytest.mark.parametrize("raw", ["on", "TRUE", "1", "yes", "killed", "disabled", " On "])
def test_env_kill_switch_engaged_disables_ai(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("AI_KILL_SWITCH", raw)
    monkeypatch.setenv("CLAUDE_FLAG_AI_ENABLED", "on")
    flags = EnvFlags()
    assert flags.enabled("ai-enabled", None, True) is False
    assert flags.value("ai-enabled", None, True) is False
    monkeypatch.delenv("CLAUDE_FLAG_AI_SUMMARIZE", raising=False)
    assert flags.enabled("ai-summarize", None, True) is True  # only the global flag is the kill switch


@pytest.mark.parametrize("raw", ["off", "false", "0", "no", ""])
def test_env_kill_switch_released_leaves_ai_on(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("AI_KILL_SWITCH", raw)
    monkeypatch.delenv("CLAUDE_FLAG_AI_ENABLED", raising=False)
    flags = EnvFlags()
    assert flags.enabled("ai-enabled", None, True) is True
    monkeypatch.setenv("CLAUDE_FLAG_AI_ENABLED", "off")
    assert flags.enabled("ai-enabled", None, True) is False


def test_env_kill_switch_unset_and_unknown(monkeypatch: pytest.MonkeyPatch, warnings: list[str]) -> None:
    flags = EnvFlags({}, global_flag="ai-global")
    assert flags.enabled("ai-global", None, True) is True
    flags = EnvFlags({"AI_KILL_SWITCH": "bananas"}, global_flag="ai-global")
    assert [flags.enabled("ai-global", None, True) for _ in range(3)] == [True] * 3
    assert len(warnings) == 1
    assert EnvFlags({"AI_KILL_SWITCH": "on"}, global_flag="ai-global").enabled("ai-enabled", None, True) is True


def test_env_value_parses_json_else_string() -> None:
    flags = EnvFlags({"CLAUDE_FLAG_AI_MODEL": "claude-opus-4-1", "CLAUDE_FLAG_AI_BUDGET": "12.5",
                      "CLAUDE_FLAG_AI_ON": "true", "CLAUDE_FLAG_AI_LIST": '["a", 1]'})
    assert flags.value("ai-model", None, None) == "claude-opus-4-1"
    assert flags.value("ai-budget", None, None) == 12.5
    assert flags.value("ai-on", None, None) is True
    assert flags.value("ai-list", None, None) == ["a", 1]
    assert flags.value("ai-missing", None, "d") == "d"


# -- static ------------------------------------------------------------------------------------------


def test_static_flags_mutation_and_parsing() -> None:
    flags = StaticFlags({"ai-summarize": True})
    assert flags.enabled("ai-summarize", None, False) is True
    flags.set("ai-summarize", False)
    assert flags.enabled("ai-summarize", None, True) is False
    flags.values["ai-summarize"] = "On"
    assert flags.enabled("ai-summarize", None, False) is True
    for raw, expected in [("off", False), ("FALSE", False), ("0", False), ("no", False), ("yes", True),
                          ("1", True), ("true", True)]:
        flags.set("ai-x", raw)
        assert flags.enabled("ai-x", None, not expected) is expected
    for junk in ["maybe", 1, None, 0.0, ["on"]]:
        flags.set("ai-x", junk)
        assert flags.enabled("ai-x", None, True) is True
        assert flags.enabled("ai-x", None, False) is False
    assert flags.enabled("ai-absent", None, True) is True
    flags.set("ai-model", "claude-opus-4-1")
    assert flags.value("ai-model", None, None) == "claude-opus-4-1"
    assert flags.value("ai-absent", None, 3) == 3


# -- factory -----------------------------------------------------------------------------------------


def test_make_provider() -> None:
    assert isinstance(make_provider("static", sdk_key=None, start_wait=0), StaticFlags)
    assert isinstance(make_provider("env", sdk_key=None, start_wait=0), EnvFlags)
    ld = make_provider("launchdarkly", sdk_key="sdk-x", start_wait=0)
    assert isinstance(ld, LaunchDarklyFlags)  # lazy: no client and no connection yet
    with pytest.raises(ConfigError, match="CLAUDE_LAUNCHDARKLY_SDK_KEY"):
        make_provider("launchdarkly", sdk_key=None, start_wait=0)
    custom = StaticFlags()
    assert make_provider(custom, sdk_key=None, start_wait=0) is custom
    with pytest.raises(ConfigError):
        make_provider("redis", sdk_key=None, start_wait=0)
    with pytest.raises(ConfigError):
        make_provider(object(), sdk_key=None, start_wait=0)
    assert flag_name("summarize") == "ai-summarize"
