"""Redis's own time in our two scripts per request, and what each part of them costs.

The guarded route of ``overhead.py`` (three budgets, one request limit, a two-model chain) is called
a few times on Redis and one round trip's two script calls (the previous request's settlement riding
along, then this request's begin) are captured as ``RedisStore._run`` gets them. They are then
replayed through ``RedisStore._run`` (redis-py, one pipeline), 50 pairs per round trip with fresh
hold ids and window members, and Redis's INFO commandstats gives the scripts' server time per pair
(EVALSHA usec, the commands they run included): a tight loop, so the caches are warm and the figure
is lower than what a request sees (``overhead.py`` prints that one).

The same pairs then run against variants of the scripts with one part cut out, so each part's cost
is the difference: empty scripts (the arguments still parsed), the request limit's sorted set, the
breaker's success record. Cut-out variants are for measuring only.

The cost with other calls' holds live on the same budget (calls in flight) is ``server_time.py``'s.

Run: .venv/bin/python bench/lua_server_time.py  (~20 s)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from typing import Any

from _common import RedisServer, machine_description
from loguru import logger
from overhead import Caller, app_guarded

from flask_claude.storage import RedisStore
from flask_claude.storage.redis import Call
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
        store = app.extensions["claude"].store.inner  # the RedisStore behind the outage guard
        captured: list[list[Call]] = []
        run = RedisStore._run

        def capture(self: RedisStore, calls: Any, **kwargs: Any) -> Any:
            captured.append(list(calls))
            return run(self, calls, **kwargs)

        for _ in range(50):
            caller()
        RedisStore._run = capture  # type: ignore[method-assign]
        try:
            for _ in range(3):
                caller()
        finally:
            RedisStore._run = run  # type: ignore[method-assign]
        # the last round trip: the previous request's settlement riding ahead of this one's begin
        settle_call, begin_call = captured[-1][-2:]
        if (settle_call.script.sha, begin_call.script.sha) != (store._settle.sha, store._begin.sha):
            raise SystemExit("lua_server_time.py: the captured round trip is not [settle, begin]: "
                             f"{[c.script.sha[:8] for c in captured[-1]]}")
        # where each call's own arguments start (after its plan's fixed ones: RedisStore.Frame)
        fixed = {id(f.script): len(f.args) for f in store._frames.values()}
        b_own, s_own = fixed[id(store._begin)], fixed[id(store._settle)]
        serial = [0]

        def pairs(b: Any, s: Any, n: int) -> list[Call]:
            """``n`` begin + settlement pairs with fresh hold ids and window members (begin's own
            arguments: now, member, rid, ...; settle's: now, rids, ...)."""
            out: list[Call] = []
            for _ in range(n):
                serial[0] += 1
                ba, sa = list(begin_call.args), list(settle_call.args)
                ba[b_own + 1], ba[b_own + 2], sa[s_own + 1] = f"m{serial[0]}", f"r{serial[0]}", f"r{serial[0]}"
                out += [Call(b, begin_call.keys, ba, epoch=True), Call(s, settle_call.keys, sa, epoch=True)]
            return out

        def scripts_of(texts: tuple[str, str]) -> tuple[Any, Any]:
            return server.client.register_script(texts[0]), server.client.register_script(texts[1])

        def server_time(b: Any, s: Any, *, warm: int, runs: int) -> float:
            """Redis's EVALSHA usec per begin + settlement pair, over ``runs`` round trips of 50 pairs."""
            for _ in range(warm):
                store._run(pairs(b, s, 50))
            server.client.config_resetstat()
            for _ in range(runs):
                store._run(pairs(b, s, 50))
            stats = server.client.info("commandstats")["cmdstat_evalsha"]
            return float(stats["usec"]) / (stats["calls"] / 2)

        results: dict[str, list[float]] = {}
        scripts = variants()
        for _ in range(ROUNDS):
            for label, texts in scripts.items():
                server.client.flushall()
                store._epoch = None  # the data-loss marker went with the flush: learn the new one
                results.setdefault(label, []).append(server_time(*scripts_of(texts), warm=10, runs=40))
        current = statistics.median(results["current scripts"])
        print(f"== Redis server time per request (begin + settlement), tight loop, median of {ROUNDS} rounds ==")
        for label, values in results.items():
            value = statistics.median(values)
            note = "" if label == "current scripts" else f"  (the part cut out: {current - value:+.1f} us)"
            print(f"{label:40s} {value:6.1f} us{note}")
        print("(with calls in flight on the same budget: bench/server_time.py)")
        budgets = [k for k in settle_call.keys if not k.startswith(store._b(""))]  # less the breaker's
        print(f"budget line keys: {len(budgets)} budgets, begin keys: {len(begin_call.keys)}, "
              f"begin arguments: {len(begin_call.args)} (+2: the data-loss marker's)")
        print(machine_description(server.version()))
        print(f"command: {sys.executable} bench/lua_server_time.py  (BENCH_ROUNDS={ROUNDS})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
