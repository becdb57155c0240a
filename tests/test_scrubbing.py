"""PII and secrets in the log: a corpus that must come out clean, and look-alikes that must survive.

Each sample is tried in several contexts (end of a sentence, after a newline, in parentheses or
quotes, followed by a comma) because the bugs were at the edges: a full stop after a phone number,
a number after a newline (which scrubbing used to see JSON-encoded, as the two characters ``\\n``),
an email with non-ASCII letters. Then the same corpus goes through a real call with
``CLAUDE_LOG_CONTENT`` (prompt and the simulator's echoed reply) and must not reach the log file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_claude.events import EventLog, scrub

from .conftest import SECRET_KEY

PHONES = {
    "US": ["415-555-0133", "(415) 555-0133", "(415)555-0133", "415.555.0133", "415 555 0133", "1-800-555-0199",
           "+1 415 555 0133", "+1-415-555-0133", "+1.415.555.0133", "+1 (415) 555-0133", "+14155550133",
           "555-0133", "4155550133"],
    "UK": ["020 7946 0958", "(020) 7946 0958", "07700 900123", "+44 20 7946 0958", "+44 (0)20 7946 0958",
           "+44 7700 900123", "+447700900123", "0044 20 7946 0958"],
    "FR": ["01 23 45 67 89", "06.12.34.56.78", "06-12-34-56-78", "+33 1 23 45 67 89", "+33 (0)1 23 45 67 89",
           "+33 6 12 34 56 78", "0033 6 12 34 56 78", "01\u00a023\u00a045\u00a067\u00a089"],
    "DE": ["030 12345678", "030-12345678", "089/1234567", "0151 23456789", "+49 30 12345678",
           "+49 (0)30 1234 5678", "+49-89-1234567", "+49 151 23456789"],
    "IN": ["+91 98765 43210", "+91-98765-43210", "98765 43210", "098765 43210", "+91-22-2345-6789", "9876543210",
           "+919876543210"],
    "international": ["+61 2 9876 5432", "+81 3-1234-5678", "+86 10 1234 5678", "+353 (1) 234 5678",
                      "+34 912 345 678", "+55 11 91234-5678", "+7 (495) 123-45-67", "0041 44 668 18 00",
                      "+1.415.555.0133", "+49.30.12345678"],
}
EMAILS = ["ann@example.com", "first.last+tag@sub.example.org", "o'brien@example.co.uk", "josé.garcía@example.com",
          "müller@bücher.de", "Ünïcødé@exämple.museum", "иван@пример.рф", "用户@例子.广告", "user@xn--bcher-kva.de",
          "x_y-z%1@mail.xn--p1ai", "ÅSA@köpenhamn.dk"]
CARDS = ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5500 0000 0000 0004",
         "3782 822463 10005", "378282246310005", "6011-0009-9013-9424"]
SECRETS = ["sk-ant-api03-abcdefghijklmnop_QRST-uvwx0123", "sk-ant-admin01-ZZZZZZZZZZZZZZZZ",
           "sk-proj-0123456789abcdefABCDEF", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc-DEF_123",
           "bearer abcdefgh12345678", "Authorization: Basic dXNlcjpwYXNzd29yZA==", "x-api-key: k3y-v4lue-xyz",
           "api_key=abcdef123456", SECRET_KEY]
# What must leave no trace: the sample minus the words around the secret part.
_SECRET_PART = {
    "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc-DEF_123": "eyJhbGciOi",
    "bearer abcdefgh12345678": "abcdefgh",
    "Authorization: Basic dXNlcjpwYXNzd29yZA==": "dXNlcjpw",
    "x-api-key: k3y-v4lue-xyz": "k3y-v4lue",
    "api_key=abcdef123456": "abcdef123456",
}
NEGATIVES = ["2026-11-30", "2026-11-30T04:28:20Z", "2026-11-30T04:28:20.123+02:00", "2026-11-30 04:28:20",
             "30/11/2026", "11/30/2026", "30.11.2026", "04:28:20", "12:30", "23:59:59.999",
             "$1,234.56", "$12,345,678.90", "€1.234,56", "1,234,567",
             "#A-10023", "order #10023", "#1234567890", "ORD-2026-0042",
             "1.2.3", "v2.10.0", "3.11.7", "10.0.19045.2965", "2024.11.30", "HTTP/1.1 200",
             "192.168.1.10", "172.16.254.10", "10.0.0.1",
             "42", "7", "1234", "12345", "123456", "1.000.000", "2019-2021", "pages 10-20", "3.14159",
             "37.7749, -122.4194", "50%", "@handle", "a@b", "x@localhost"]

CONTEXTS = ["{}", "Call me at {}.", "line one\n{}\nline two", "({})", '"{}"', "{}, thanks!", "\t{}\t", "<{}>",
            "contact: {}; later", "Numbers: {}!"]


def _samples() -> list[tuple[str, str]]:
    out = [(f"phone {country}", p) for country, phones in PHONES.items() for p in phones]
    return out + [("email", e) for e in EMAILS] + [("card", c) for c in CARDS] + [("secret", s) for s in SECRETS]


def _leaks(sample: str, kind: str, scrubbed: str) -> bool:
    if kind == "secret":
        return _SECRET_PART.get(sample, sample) in scrubbed
    if kind == "email":
        return "@" in scrubbed
    return bool(re.search(r"\d", scrubbed))  # not one digit of a phone or card (the contexts have none)


@pytest.mark.parametrize(("kind", "sample"), _samples())
def test_pii_and_secrets_are_scrubbed_in_every_context(kind: str, sample: str) -> None:
    for context in CONTEXTS:
        text = context.format(sample)
        scrubbed = scrub(text, (SECRET_KEY,))
        assert not _leaks(sample, kind, scrubbed), f"{kind} {sample!r} in {context!r} -> {scrubbed!r}"
        # the text around it is left alone
        for part in context.split("{}"):
            assert part in scrubbed, (text, scrubbed)


@pytest.mark.parametrize("sample", NEGATIVES)
def test_look_alikes_survive(sample: str) -> None:
    for context in CONTEXTS:
        text = context.format(sample)
        assert scrub(text) == text, (text, scrub(text))


def test_a_sentence_keeps_its_numbers_and_loses_its_pii() -> None:
    text = ("Order #A-10023 (v2.10.0) shipped 2026-11-30 at 14:05 for $1,234.56.\n"
            "Questions? Call 415-555-0133.\nOr write to josé@exämple.fr, card 4111 1111 1111 1111.")
    assert scrub(text) == ("Order #A-10023 (v2.10.0) shipped 2026-11-30 at 14:05 for $1,234.56.\n"
                           "Questions? Call [phone].\nOr write to [email], card [card].")


# --- through a real call: prompt and reply as logged with CLAUDE_LOG_CONTENT -----------------------------


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_logged_prompt_and_reply_are_clean(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = make_app(CLAUDE_LOG_CONTENT=True, CLAUDE_MODELS=["claude-haiku-4-5"], CLAUDE_MAX_TOKENS_CAP=4096)
    claude = app.extensions["claude"]
    samples = _samples()
    corpus = "\n".join(context.format(sample) for (_, sample), context in
                       zip(samples, CONTEXTS * (len(samples) // len(CONTEXTS) + 1), strict=False))
    keep = "\n".join(NEGATIVES)
    with app.app_context():
        # "echo: " makes the simulator answer the text verbatim: the reply carries the same PII.
        claude.messages.create(max_tokens=4096, messages=[
            {"role": "user", "content": "earlier turn, call me on\n+44 20 7946 0958"},
            {"role": "assistant", "content": [{"type": "text", "text": "Noted: müller@bücher.de"}]},
            {"role": "user", "content": f"echo: {corpus}\n{keep}"}])
    line = _log(tmp_path / "claude.jsonl")[-1]
    assert line["event"] == "claude_api_call"
    prompt, response = line["prompt"], line["response"]
    assert json.loads(prompt)[2]["content"].startswith("echo: ")  # still the call's messages, as JSON
    raw = (tmp_path / "claude.jsonl").read_text(encoding="utf-8")
    for kind, sample in samples:
        for field, text in (("prompt", json.loads(prompt)[2]["content"]), ("response", response)):
            assert sample not in text, (field, sample)
            if kind == "secret":
                assert _SECRET_PART.get(sample, sample) not in text, (field, sample)
        assert sample not in raw
    assert "7946" not in raw and "müller" not in raw
    for sample in NEGATIVES:  # the look-alikes reach the log as written
        assert sample in json.loads(prompt)[2]["content"] and sample in response, sample
    assert re.fullmatch(r"req_[A-Za-z0-9_]+", line["request_id"])


def test_a_request_id_of_the_wrong_shape_is_not_logged(tmp_path: Path) -> None:
    """``request_id`` comes from the upstream's header (a proxy at CLAUDE_BASE_URL can put anything there):
    it is checked against the API's shape instead of scrubbed, and replaced when it does not match."""
    path = tmp_path / "ids.jsonl"
    log = EventLog(path=str(path), secrets=(SECRET_KEY,), hash_users=True, log_content=False, salt="s")
    good = "req_011CSHoEeqs5C35K2UUqR7Fy"
    bad = ["ann@example.com", f"req_{SECRET_KEY}", 'req_1\n{"event": "forged"}', "req_", "req_" + "a" * 200,
           "415-555-0133", "", "req_a.b"]
    for value in [good, *bad]:
        log.emit("claude_api_call", {"request_id": value, "stop_reason": value, "error_type": value})
    log.emit("batch_settled", {"batch_id": "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF"})
    log.emit("batch_settled", {"batch_id": "ann@example.com"})
    lines = _log(path)
    assert len(lines) == len(bad) + 3  # the forged newline did not make a line of its own
    assert lines[0]["request_id"] == good
    assert [line["request_id"] for line in lines[1:len(bad) + 1]] == ["[invalid]"] * len(bad)
    # stop_reason and error_type are the API's identifiers: a word, no "@", "-", "." or spaces
    assert [line["stop_reason"] for line in lines[:len(bad) + 1]] == \
        [good] + ["[invalid]"] * 3 + ["req_"] + ["[invalid]"] * 4
    assert all(line["error_type"] == line["stop_reason"] for line in lines[:len(bad) + 1])
    assert (lines[-2]["batch_id"], lines[-1]["batch_id"]) == ("msgbatch_013Zva2CMHLNnXjNJJKqJ2EF", "[invalid]")
    text = path.read_text()
    assert "ann@example.com" not in text and "forged" not in text and "0133" not in text


def test_a_lone_surrogate_does_not_cost_the_line(tmp_path: Path) -> None:
    """Text no UTF-8 encoder takes (a lone surrogate from a client's JSON) is escaped, not a lost line."""
    path = tmp_path / "s.jsonl"
    log = EventLog(path=str(path), secrets=(), hash_users=True, log_content=True, salt="s")
    log.emit("feature_degraded", {"reason": "invalid_request", "detail": "bad \ud800 text, 415-555-0133"})
    (line,) = _log(path)
    assert line["detail"] == "bad \ud800 text, [phone]"
