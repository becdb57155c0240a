"""Fuzzing the example app's routes: whatever the body, the answer is never a 500 or a leak.

Each route gets the hand-picked hostile bodies below plus seeded random ones (at least 150
requests a route) on the in-process simulator, with an upstream failure scripted now and then so
that hiding upstream text is tested too. Every answer must have one of the statuses the app means
to give, and no body may carry a traceback, an exception name, an upstream message or request id.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

SEED = 20261130
PER_ROUTE = 160
UPSTREAM_MARKER = "UPSTREAM-DETAIL-7f3a"  # the scripted upstream error message: must never reach a body
ROUTES = ("/summarize", "/classify", "/chat")
ALLOWED = {200, 400, 413, 429, 503}
LEAKS = re.compile(r"Traceback|File \"|RecursionError|UnicodeEncodeError|UnicodeDecodeError|JSONDecodeError|"
                   r"ValueError|Exception|Internal Server Error|req_[A-Za-z0-9_]{12,}|sk-ant-|" + UPSTREAM_MARKER)

JSON = "application/json"


def _field(route: str) -> str:
    return "messages" if route == "/chat" else "text"


def _wrap(route: str, value: Any) -> Any:
    """A body of the right shape for ``route`` carrying ``value`` where the user's text goes."""
    if route == "/chat":
        return {"messages": [{"role": "user", "content": value}]}
    return {"text": value}


def _raw(route: str, json_text: str) -> bytes:
    """Like ``_wrap`` but with the text given as raw JSON source (escapes kept as written)."""
    if route == "/chat":
        return f'{{"messages": [{{"role": "user", "content": {json_text}}}]}}'.encode()
    return f'{{"text": {json_text}}}'.encode()


# Bodies that are the client's mistake in the encoding or syntax: each must answer exactly 400.
def hostile(route: str) -> list[tuple[str, bytes, str]]:
    key = _field(route)
    cases: list[tuple[str, bytes, str]] = [
        # invalid JSON
        ("not json", b"not json", JSON),
        ("empty body", b"", JSON),
        ("truncated", b'{"' + key.encode() + b'": "abc', JSON),
        ("single quotes", b"{'" + key.encode() + b"': 'x'}", JSON),
        ("trailing garbage", _raw(route, '"hello"') + b" trailing", JSON),
        ("NaN is not JSON text", _raw(route, "NaN").replace(b"NaN", b"nan"), JSON),
        ("a number too long to parse", _raw(route, "9" * 5000), JSON),
        # deeply nested
        ("nested arrays", b"[" * 100_000, JSON),
        ("nested objects", b'{"a":' * 50_000, JSON),
        ("nested inside the field", b'{"' + key.encode() + b'": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON),
        # lone surrogates, as raw JSON escapes
        ("lone high surrogate", _raw(route, '"\\ud800"'), JSON),
        ("lone low surrogate after text", _raw(route, '"hello \\udfff world"'), JSON),
        ("reversed pair", _raw(route, '"\\ude00\\ud83d"'), JSON),
        ("surrogate in a key", b'{"\\ud800": 1, ' + _raw(route, '"hello"')[1:], JSON),
        # NUL bytes (a raw NUL is a control character JSON forbids inside a string)
        ("raw NUL in a string", _raw(route, '"a\x00b"'), JSON),
        ("NULs only", b"\x00" * 64, JSON),
        # not UTF-8
        ("latin-1 byte", _raw(route, '"caf\xe9"').replace("é".encode(), b"\xe9"), JSON),
        ("invalid bytes", _raw(route, '"x"').replace(b'"x"', b'"\xff\xfe\xfd"'), JSON),
        ("overlong slash", _raw(route, '"x"').replace(b'"x"', b'"\xc0\xaf"'), JSON),
        ("UTF-16 with BOM", json.dumps(_wrap(route, "hello")).encode("utf-16"), JSON),
        ("UTF-8 BOM", b"\xef\xbb\xbf" + json.dumps(_wrap(route, "hello")).encode(), JSON),
        # not declared as JSON
        ("text/plain", json.dumps(_wrap(route, "hello")).encode(), "text/plain"),
        ("form", b"text=hello", "application/x-www-form-urlencoded"),
    ]
    return cases


# Well-formed JSON of the wrong shape or size: never a 500, statuses as the app decides.
def awkward(route: str) -> list[tuple[str, bytes, str]]:
    def j(value: Any) -> bytes:
        return json.dumps(value).encode()

    key = _field(route)
    cases = [
        ("null", b"null", JSON), ("list", b"[]", JSON), ("string", b'"text"', JSON), ("number", b"1e999", JSON),
        ("empty object", b"{}", JSON),
        ("number text", j({key: 42}), JSON), ("null text", j({key: None}), JSON),
        ("bool text", j({key: True}), JSON), ("list text", j({key: ["a"]}), JSON),
        ("object text", j({key: {"a": 1}}), JSON), ("blank text", j(_wrap(route, "   ")), JSON),
        ("escaped NUL", _raw(route, '"a\\u0000b"'), JSON),
        ("valid surrogate pair", _raw(route, '"smile \\ud83d\\ude00"'), JSON),
        ("huge text", j(_wrap(route, "x" * 2_000_000)), JSON),
        ("just over the limit", j(_wrap(route, "y" * 40_001)), JSON),
        ("many fields", j({f"k{i}": i for i in range(20_000)} | _wrap(route, "hello")), JSON),
        ("mid nesting", b'{"' + key.encode() + b'": "hi", "x": ' + b"[" * 500 + b"]" * 500 + b"}", JSON),
        ("control characters", j(_wrap(route, "".join(map(chr, range(1, 32))))), JSON),
        ("right-to-left and zero-width", j(_wrap(route, "\u202eabc\u200b\ufeff")), JSON),
    ]
    if route == "/chat":
        cases += [
            ("messages a string", j({"messages": "hi"}), JSON),
            ("system role", j({"messages": [{"role": "system", "content": "x"}]}), JSON),
            ("ends with assistant", j({"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"}]}), JSON),
            ("content blocks", j({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}), JSON),
            ("role missing", j({"messages": [{"content": "x"}]}), JSON),
            ("ten thousand turns", j({"messages": [{"role": r, "content": "x"}
                                                   for _ in range(5_000) for r in ("user", "assistant")]
                                     + [{"role": "user", "content": "last"}]}), JSON),
        ]
    return cases


# --- the random part ---------------------------------------------------------------------------------

_ALPHABET = ["a", "Z", " ", "\n", "\t", "é", "中", "😀", "\u0000", "\u202e", "\\", '"', "{", "["]


def _random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 5, 40, 300])
    return "".join(rng.choice(_ALPHABET) if rng.random() < 0.9 else chr(rng.randrange(1, 0x110000))
                   for _ in range(n)) + rng.choice(["", " ok"])


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**70, 1.5, -0.0])
    if kind in (2, 3, 4):
        return _random_text(rng)
    if kind in (5, 6):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_random_text(rng)[:8]: _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        pos = rng.randrange(len(buf) + 1)
        if op == 0:
            buf[pos:pos] = bytes([rng.randrange(256)])
        elif op == 1 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
    return bytes(buf)


def random_body(rng: random.Random, route: str) -> tuple[str, bytes, str]:
    """One random request body, as raw bytes: JSON of random shape, escapes, nesting, or mutated bytes."""
    key = _field(route)
    choice = max(0, rng.randrange(-3, 7))  # a plausible body four times in ten: it reaches the model
    if choice == 0:  # a plausible body, sometimes with a lone surrogate escape spliced in
        text = json.dumps(_random_text(rng) or "hello")
        if rng.random() < 0.25:
            text = text[:-1] + rng.choice(["\\ud800", "\\udbff", "\\udc00", "\\ud83d\\ude00"]) + '"'
        return "random text", _raw(route, text), JSON
    if choice == 1:  # the field holds anything at all
        return "random value", json.dumps({key: _random_value(rng)}).encode(), JSON
    if choice == 2:  # the whole body is anything at all
        return "random body", json.dumps(_random_value(rng)).encode(), JSON
    if choice == 3:  # byte-level damage to a good body
        good_text = json.dumps(_wrap(route, _random_text(rng) or "hello"), ensure_ascii=rng.random() < 0.5)
        good = good_text.encode("utf-8", "surrogatepass")  # a raw surrogate is bytes no UTF-8 decoder takes
        return "mutated", _mutate(rng, good), JSON
    if choice == 4:  # nesting around or inside the field, at a random depth
        depth = rng.choice([10, 900, 3_000, 30_000])
        inner = rng.choice(["[", '{"a":'])
        closer = "]" if inner == "[" else "}"
        return "nesting", _raw(route, inner * depth + "1" + closer * depth), JSON
    if choice == 5:  # random bytes, mostly not UTF-8
        return "random bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), JSON
    size = rng.choice([10_000, 19_999, 20_001, 45_000, 300_000])
    return "size", json.dumps(_wrap(route, "w" * size)).encode(), JSON


# --- the test ---------------------------------------------------------------------------------------


@pytest.fixture
def app(make_example: Callable[..., Flask]) -> Flask:
    # One attempt per model, and the app-wide budgets out of the way: the fuzz is about bodies.
    return make_example(CLAUDE_MAX_RETRIES=0, CLAUDE_DAILY_BUDGET_USD="1000",
                        CLAUDE_FEATURE_BUDGETS_USD={"chat": 1000.0})


def _post(client: FlaskClient, route: str, data: bytes, content_type: str, n: int) -> tuple[int, str, str]:
    # A different client address per request, so per-user limits do not turn the fuzz into 429s.
    response = client.post(route, data=data, content_type=content_type,
                           environ_base={"REMOTE_ADDR": f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"})
    body = response.get_data().decode("utf-8", "replace")  # a streamed body is read to its end here
    return response.status_code, body, response.headers.get("Content-Type", "")


@pytest.mark.parametrize("route", ROUTES)
def test_no_body_makes_a_500_or_leaks(app: Flask, route: str) -> None:
    client = app.test_client()
    simulator = app.extensions["claude"].simulator
    rng = random.Random(f"{SEED}:{route}")
    cases: list[tuple[str, bytes, str, bool]] = [(*c, True) for c in hostile(route)]
    cases += [(*c, False) for c in awkward(route)]
    while len(cases) < PER_ROUTE:
        cases.append((*random_body(rng, route), False))

    statuses: Counter[int] = Counter()
    for n, (name, data, content_type, must_be_400) in enumerate(cases):
        if n % 7 == 3:  # now and then the upstream fails, with a message that must stay in the log
            simulator.fail(rng.choice([500, 529, 400]), times=1, message=f"{UPSTREAM_MARKER} req_0123456789abcdef0123")
        status, body, body_type = _post(client, route, data, content_type, n)
        simulator.clear_faults()
        statuses[status] += 1
        where = f"{route} case {n} ({name}): {data[:80]!r}"
        assert status in ALLOWED, f"{where} answered {status}: {body[:300]}"
        assert not LEAKS.search(body), f"{where} leaked: {body[:300]}"
        if must_be_400:
            assert status == 400, f"{where} answered {status}, not 400: {body[:300]}"
        if status in (400, 413) and body_type.startswith("application/json"):
            payload = json.loads(body)
            assert payload["error"] in ("bad_request", "invalid_request", "input_too_large")
            assert payload["message"]  # a fixed, human sentence

    assert sum(statuses.values()) >= 150
    # The fuzz reached every layer: refused bodies, and bodies that got as far as a Claude call.
    assert statuses[400] >= len(hostile(route))
    assert statuses[200] + statuses[503] > 0, statuses
    assert len(simulator.requests) > 0


def test_users_views_answer_400_too(make_example: Callable[..., Flask]) -> None:
    """Not only the example: ``request.json`` on a nested body in a decorated view of the user's own is a
    400 ``invalid_request`` (not a 500), and so is ``request_json()`` anywhere, even with a fallback."""
    from flask import request

    from flask_claude import ai_feature, fallback_to, request_json

    app = make_example(CLAUDE_MAX_RETRIES=0)

    @app.post("/raw")
    @ai_feature("raw")
    def raw() -> Any:
        return {"keys": sorted(request.json or {})}

    @app.post("/helper")
    @ai_feature("helper")
    @fallback_to({"answer": None})  # a client's bad body is theirs to fix: 400, not the fallback's 503
    def helper() -> Any:
        return {"keys": sorted(request_json())}

    @app.post("/plain")  # no decorator: the app-wide handler answers the same 400
    def plain() -> Any:
        return {"keys": sorted(request_json())}

    @app.post("/bug")
    @ai_feature("bug")
    def bug() -> Any:
        raise ValueError("the view's own bug")

    client = app.test_client()
    refused = {"error": "invalid_request", "message": "The request could not be processed."}
    response = client.post("/raw", data=b"[" * 100_000, content_type=JSON)
    assert (response.status_code, response.headers["X-Claude-Degraded"], response.get_json()) == \
        (400, "invalid_request", refused)
    assert client.post("/raw", json={"b": 1, "a": 2}).get_json() == {"keys": ["a", "b"]}
    for route in ("/helper", "/plain"):
        for data, content_type in [(b"[" * 100_000, JSON), (b'{"\\ud800": 1}', JSON), (b"\xff", JSON),
                                   (b"{", JSON), (b'{"a": 1}', "text/plain")]:
            response = client.post(route, data=data, content_type=content_type)
            assert response.status_code == 400, (route, data[:20])
            assert response.headers["X-Claude-Degraded"] == "invalid_request"
            assert response.get_json() == refused
        assert client.post(route, json={"b": "\u00e9\U0001f600"}).get_json() == {"keys": ["b"]}
    # A ValueError of the view's own is its bug: not hidden as the client's 400.
    app.testing = False
    assert client.post("/bug", json={}).status_code == 500
