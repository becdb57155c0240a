"""The lean Redis path (storage/wire.py) against a real redis-server: replies that span many reads,
frames packed once, and a frame given the wrong number of arguments refused before anything is sent."""

from __future__ import annotations

import socket
import time

import pytest
import redis

from flask_claude.storage.wire import Frame, LeanScripts, expand, pack

from .conftest import RedisServer


@pytest.mark.parametrize("spin", [0.0, 0.0005])  # CLAUDE_STORAGE_SPIN off, and its default
def test_a_reply_larger_than_one_read_is_parsed_whole(redis_server: RedisServer, spin: float) -> None:
    client = redis_server.client
    big = client.register_script(
        "local t = {} for i = 1, tonumber(ARGV[1]) do t[i] = {i, string.rep('x', 20) .. i} end return t")
    nested = client.register_script("return {ARGV[1], {tonumber(ARGV[2]), false}, redis.error_reply('bad')}")
    lean = LeanScripts(client, timeout=2.0, spin=spin)
    replies = lean.run([(big, [], [20000]), (nested, [], ["a b", 7])])
    assert len(replies[0]) == 20000  # ~600 KB: many recv calls
    assert replies[0][12345] == [12346, b"x" * 20 + b"12346"]
    assert replies[1][0] == b"a b" and replies[1][1] == [7, None]
    assert isinstance(replies[1][2], Exception) and "bad" in str(replies[1][2])
    # the connection is still in step: the next reply is this call's, not a leftover
    assert lean.run([(nested, [], ["c", 1])])[0][:2] == [b"c", [1, None]]


def test_a_frame_sends_its_fixed_part_and_the_calls_own_arguments(redis_server: RedisServer) -> None:
    client = redis_server.client
    echo = client.register_script("return {KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]}")
    frame = Frame(echo, ["k1", "k2"], ["fixed"], n_own=2)
    lean = LeanScripts(client, timeout=2.0)
    assert lean.run([(frame, (), ["now", 42])]) == [[b"k1", b"k2", b"fixed", b"now", b"42"]]
    assert expand((frame, (), ["now", 42])) == (echo, ["k1", "k2"], ["fixed", "now", 42])
    # a script Redis forgot (a restart, SCRIPT FLUSH) is loaded and run again
    client.script_flush()
    assert lean.run([(frame, (), ["again", 1])]) == [[b"k1", b"k2", b"fixed", b"again", b"1"]]
    with pytest.raises(ValueError, match="2 own arguments"):
        pack([(frame, (), ["only one"])])


def test_spinning_stops_while_replies_are_slow_and_resumes_when_they_are_quick(redis_server: RedisServer) -> None:
    client = redis_server.client
    slow = client.register_script(  # ~20 ms of Redis's time: a busy or distant Redis
        "local t = redis.call('TIME') local start = t[1] * 1e6 + t[2] "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start >= 20000 return 1")
    quick = client.register_script("return 1")
    lean = LeanScripts(client, timeout=2.0, spin=0.005)
    assert lean.run([(quick, [], [])]) == [1]
    conn = lean._conn()
    for _ in range(8):
        assert lean.run([(slow, [], [])]) == [1]
    assert conn.typical > conn.spin  # replies slower than the spin: it would burn CPU for nothing
    for _ in range(80):
        assert lean.run([(quick, [], [])]) == [1]
    assert conn.typical < conn.spin


@pytest.mark.parametrize("spin", [0.0, 0.0005])
def test_a_redis_that_never_answers_times_out(spin: float) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, reads nothing, answers nothing
        client = redis.Redis(host="127.0.0.1", port=silent.getsockname()[1])
        script = client.register_script("return 1")  # not loaded: the SHA is computed locally
        lean = LeanScripts(client, timeout=0.2, spin=spin)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            lean.run([(script, [], [])])
        assert time.monotonic() - started < 5  # bounded by the socket timeout, not hung
