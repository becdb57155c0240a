"""The lean Redis path (storage/wire.py) against a real redis-server: replies that span many reads,
frames packed once, and a frame given the wrong number of arguments refused before anything is sent."""

from __future__ import annotations

import pytest

from flask_claude.storage.wire import Frame, LeanScripts, expand, pack

from .conftest import RedisServer


def test_a_reply_larger_than_one_read_is_parsed_whole(redis_server: RedisServer) -> None:
    client = redis_server.client
    big = client.register_script(
        "local t = {} for i = 1, tonumber(ARGV[1]) do t[i] = {i, string.rep('x', 20) .. i} end return t")
    nested = client.register_script("return {ARGV[1], {tonumber(ARGV[2]), false}, redis.error_reply('bad')}")
    lean = LeanScripts(client, timeout=2.0)
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
