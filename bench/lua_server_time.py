"""Redis's own time in our two scripts per request, and what each part of them costs.

The guarded route of ``overhead.py`` (three budgets, one request limit, a two-model chain) is called
a few times on Redis and one request's two script calls (the settlement riding along, then the next
request's begin) are captured as sent. They are then replayed, 50 pairs per round trip with fresh
hold ids and window members, and Redis's INFO commandstats gives the scripts' server time per pair
(EVALSHA usec, the commands they run included): a tight loop, so the caches are warm and the figure
is about half of what a request sees (``overhead.py`` prints that one, ~60-100 us).

The same pairs then run against variants of the scripts with one part cut out, so each part's cost
is the difference: empty scripts (the arguments still parsed), the request limit's sorted set, the
breaker's success record. Cut-out variants are for measuring only.

Last, the current scripts again with other calls' live holds planted on the app-wide budget (as
many as calls in flight across all workers): a hold is read back by every later step (one HGETALL
of the budget's hash, each hold parsed in Lua), so the step's cost grows with concurrency.

Run: .venv/bin/python bench/lua_server_time.py  (~20 s)
"""

from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any

from _common import RedisServer, machine_description
from loguru import logger
from overhead import Caller, app_guarded

from flask_claude.storage import wire
from flask_claude.storage.scripts import lua

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "8"))


def variants() -> dict[str, tuple[str, str]]:
    begin, settle = lua("functions", "begin"), lua("functions", "settle")

    def cut(text: str, old: str, new: str) -> str:
        if old not in text:
            raise SystemExit(f"lua_server_time.py: the script changed, update the variant: {old!r}")
        return text.replace(old, new)

    no_window = cut(cut(begin, "for j = 1, nr do\n  local key = KEYS[ng + j]\n  local limit",
                        "for j = 1, 0 do\n  local key = KEYS[ng + j]\n  local limit"),
                    "for j = 1, nr do\n  local key = KEYS[ng + j]\n  redis.call('ZADD'",
                    "for j = 1, 0 do\n  local key = KEYS[ng + j]\n  redis.call('ZADD'")
    no_window = cut(cut(no_window, "table.insert(out, remaining[j])", "table.insert(out, 1)"),
                    "table.insert(out, tostring(resets[j]))", "table.insert(out, '1')")
    return {
        "current scripts": (begin, settle),
        "empty scripts (arguments still sent)": ("return {1,'',-1,'0',0,0,0,1,0,'0',1,'1',''}", "return {}"),
        "no request-limit window (sorted set)": (no_window, settle),
        "no breaker success record": (begin, cut(settle, "if record then\n", "if false then\n")),
    }


def main() -> None:
    logger.remove()
    server = RedisServer()
    try:
        app = app_guarded(server.url, os.path.join(tempfile.mkdtemp(), "c.jsonl"), "lua_time")
        caller = Caller(app)
        captured: list[list[Any]] = []
        send = wire.LeanScripts._send

        def capture(scripts: Any, calls: Any) -> Any:
            captured.append(list(calls))
            return send(scripts, calls)

        for _ in range(50):
            caller()
        wire.LeanScripts._send = capture  # type: ignore[method-assign]
        for _ in range(3):
            caller()
        wire.LeanScripts._send = send  # type: ignore[method-assign]
        (settle_frame, _, settle_args), (begin_frame, _, begin_args) = captured[-1][-2:]
        lean = app.extensions["claude"].store.inner._lean
        serial = [0]

        def pairs(b: wire.Frame, s: wire.Frame, n: int) -> list[Any]:
            out: list[Any] = []
            for _ in range(n):
                serial[0] += 1
                ba, sa = list(begin_args), list(settle_args)
                ba[1], ba[2], sa[1] = f"m{serial[0]}", f"r{serial[0]}", f"r{serial[0]}"
                out += [(b, (), ba), (s, (), sa)]
            return out

        def frames(texts: tuple[str, str]) -> tuple[wire.Frame, wire.Frame]:
            """The captured calls' frames, pointed at these script texts."""
            return (wire.Frame(server.client.register_script(texts[0]), begin_frame.keys, begin_frame.args,
                               begin_frame.n_own),
                    wire.Frame(server.client.register_script(texts[1]), settle_frame.keys, settle_frame.args,
                               settle_frame.n_own))

        def server_time(b: wire.Frame, s: wire.Frame, *, warm: int, runs: int) -> float:
            """Redis's EVALSHA usec per begin + settlement pair, over ``runs`` round trips of 50 pairs."""
            for _ in range(warm):
                lean.run(pairs(b, s, 50))
            server.client.config_resetstat()
            for _ in range(runs):
                lean.run(pairs(b, s, 50))
            stats = server.client.info("commandstats")["cmdstat_evalsha"]
            return float(stats["usec"]) / (stats["calls"] / 2)

        results: dict[str, list[float]] = {}
        scripts = variants()
        for _ in range(ROUNDS):
            for label, texts in scripts.items():
                server.client.flushall()
                results.setdefault(label, []).append(server_time(*frames(texts), warm=10, runs=40))
        current = statistics.median(results["current scripts"])
        print(f"== Redis server time per request (begin + settlement), tight loop, median of {ROUNDS} rounds ==")
        for label, values in results.items():
            value = statistics.median(values)
            note = "" if label == "current scripts" else f"  (the part cut out: {current - value:+.1f} us)"
            print(f"{label:40s} {value:6.1f} us{note}")
        print("\n== the same, with other calls' live holds on the app-wide budget (calls in flight) ==")
        app_wide = next(key for key in begin_frame.keys if ":usd:global:" in key)
        current_frames = frames(scripts["current scripts"])
        for live in (0, 16, 64, 256):
            server.client.flushall()
            if live:
                until = repr(float(begin_args[0]) + 3600)
                server.client.hset(app_wide, mapping={f"r:other{i}": f"100 {until}" for i in range(live)})
            print(f"{live:4d} other holds live: {server_time(*current_frames, warm=5, runs=20):6.1f} us "
                  "per begin + settlement")
        print(f"budget line keys: {len(settle_frame.keys) - 1} budgets, "
              f"begin keys: {len(begin_frame.keys)}, begin arguments: {len(begin_frame.args) + len(begin_args)}")
        print(machine_description(server.version()))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
