"""Redis restarts, killed connections and data loss under load, on real gunicorn workers; and what
caps one process at 100 calls in flight.

A  restart   gunicorn, 2 gthread workers x 8 threads, on a redis-server of this script's own (loopback,
             free port, ``--dir <tmp> --dbfilename dump.rdb --save "" --appendonly no``). CLAUDE_SIMULATE
             (in-process simulator, BENCH_SIM_LATENCY, 50 ms), route ``/ask``: ``@ai_feature("ask")``,
             ``@budgeted(requests="5/minute")`` per user (user key from ``X-User``), a daily budget that
             never refuses. USERS users each send a burst of BURST concurrent requests every ~1 s
             (staggered) for LOAD_S seconds; half-way through, ``SHUTDOWN SAVE`` and a new redis-server on
             the same port from the dump. Run with CLAUDE_STORAGE_FAILURE "open" and "closed".
             Printed: per user the most 200s in any 60 s window (by the request's send time and by its
             answer's time) and the shortest span of 6 consecutive 200s (< 60 s: the limit was passed);
             storage events per worker pid; Redis's ``spent`` and ``held`` on the global daily budget key
             after a clean stop vs the sum of the ``claude_api_call`` lines' ``cost_usd`` (each rounded up
             to whole micro-dollars, as budgets count).
B  kill      as A ("open"), with ``CLIENT KILL TYPE normal`` (KILLS times, 4 s apart, mid-run) instead
             of the restart.
C  flushall  route ``/spend`` (no request limit), CLIENTS threads posting back to back, a daily budget of
             C_CALLS calls (one call's cost measured in-process first); at 75% of it in Redis, FLUSHALL;
             the load stays on until the budget refuses (budget_exhausted for 3 s) or C_MAX_S.
             Printed: ``storage_data_lost`` per worker, ``budget_alert`` lines per threshold, final spent
             vs the budget (in calls), the longest run of 503 ``budget_busy`` answers.
D  cap       one process, THREADS_D threads calling the WSGI app directly, the simulator answering
             after D_LATENCY s: the most calls the simulator sees at once, (1) in-process simulator
             transport, memory:// and Redis storage; (2) loopback simulator server (CLAUDE_BASE_URL, so
             flask-claude's own ``httpx2.HTTPTransport()``); (3) as 2 with
             ``Claude(http_transport=httpx2.HTTPTransport(limits=httpx2.Limits(max_connections=1000)))``.

The same file is the app gunicorn serves (``restart_drill:create_app()``, from bench/). Only 127.0.0.1;
never the system Redis on 6379; every process started here is stopped here, every wait is bounded.

Run: .venv/bin/python bench/restart_drill.py [A] [B] [C] [D]   (all by default; about 6 minutes)
     BENCH_POLICIES=open,closed  BENCH_LOAD_S=65
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

# What the pid sink writes (per worker): the storage events, alerts and calls.
WATCH = {"storage_unavailable", "storage_recovered", "storage_data_lost", "storage_not_persistent",
         "spend_replayed", "budget_alert", "claude_api_call", "claude_api_error", "reservation_exceeded"}
MODEL = "claude-haiku-4-5"
MAX_TOKENS = 120
PROMPT = "Write a haiku about a careful budget."


# --- the app gunicorn serves -------------------------------------------------------------------------

def create_app() -> Any:
    from flask import Flask, request
    from loguru import logger

    from flask_claude import Claude, ai_feature, budgeted, fallback_to
    from flask_claude.events import claude_fields
    from flask_claude.flags import StaticFlags

    # flask-claude's own file sink (CLAUDE_LOG_PATH) has no pid; a second sink adds it for the watched
    # events, one O_APPEND write per line.
    logger.remove()
    fd = os.open(os.environ["DRILL_PID_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def pid_sink(message: Any) -> None:
        fields = claude_fields(message.record)
        if fields and fields.get("event") in WATCH:
            os.write(fd, (json.dumps({"pid": os.getpid(), **fields}, default=str) + "\n").encode())

    logger.add(pid_sink, level="DEBUG", filter=lambda r: claude_fields(r) is not None, format="{message}")

    app = Flask("restart_drill")
    app.config.update(
        CLAUDE_SIMULATE=True,
        CLAUDE_MODELS=[MODEL],
        CLAUDE_STORAGE_URI=os.environ["DRILL_REDIS_URL"],
        CLAUDE_LOG_PATH=os.environ["DRILL_LOG_PATH"],
        CLAUDE_DAILY_BUDGET_USD=float(os.environ["DRILL_BUDGET_USD"]),
        CLAUDE_STORAGE_FAILURE=os.environ.get("DRILL_FAILURE", "open"),
        CLAUDE_MAX_RETRIES=0,
        CLAUDE_FLAGS=StaticFlags(),
        CLAUDE_HASH_USERS=False,  # the drill's users are names: the log's user field says whose call it was
    )
    claude = Claude(app)
    app.extensions["claude"].simulator.latency(float(os.environ.get("DRILL_SIM_LATENCY", "0.05")))

    @claude.user_loader
    def user() -> str:
        return request.headers.get("X-User", "anonymous")  # a drill: the client names its user

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    def one_call() -> Any:
        msg = claude.messages.create(model=MODEL, max_tokens=MAX_TOKENS,
                                     messages=[{"role": "user", "content": PROMPT}])
        return {"text": getattr(msg.content[0], "text", None)}

    @app.post("/ask")
    @ai_feature("ask")
    @budgeted(requests="5/minute")
    @fallback_to({"text": None}, status=503)
    def ask() -> Any:
        return one_call()

    @app.post("/spend")
    @ai_feature("spend")
    @fallback_to({"text": None}, status=503)
    def spend() -> Any:
        return one_call()

    return app


# --- the drill ---------------------------------------------------------------------------------------

def main() -> None:
    import math
    import shutil
    import subprocess
    import sys
    import tempfile
    import threading
    import urllib.error
    import urllib.request
    from collections import Counter, defaultdict
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import redis
    from _common import Gunicorn, free_port, machine_description, percentile, table, terminate
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    LATENCY = float(os.environ.get("BENCH_SIM_LATENCY", "0.05"))
    USERS = int(os.environ.get("BENCH_USERS", "6"))
    BURST = int(os.environ.get("BENCH_BURST", "16"))
    LOAD_S = float(os.environ.get("BENCH_LOAD_S", "65"))
    POLICIES = os.environ.get("BENCH_POLICIES", "open,closed").split(",")
    KILLS = int(os.environ.get("BENCH_KILLS", "3"))
    CLIENTS = int(os.environ.get("BENCH_CLIENTS", "32"))
    C_CALLS = int(os.environ.get("BENCH_C_CALLS", "4000"))
    C_MAX_S = float(os.environ.get("BENCH_C_MAX_S", "150"))
    THREADS_D = int(os.environ.get("BENCH_THREADS_D", "300"))
    D_LATENCY = float(os.environ.get("BENCH_D_LATENCY", "2.0"))
    WORKERS, THREADS = 2, 8
    parts = [a.upper() for a in sys.argv[1:]] or ["A", "B", "C", "D"]
    tmp_root = Path(tempfile.mkdtemp(prefix="bench-restart-"))

    class DrillRedis:
        """redis-server of our own on a fixed free loopback port, RDB file in its own dir; restartable."""

        def __init__(self, name: str) -> None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("redis-server is not installed")
            self.binary: str = binary
            self.port = free_port()
            assert self.port != 6379
            self.dir = tmp_root / f"redis-{name}"
            self.dir.mkdir()
            self.log = open(self.dir / "redis.log", "ab")  # closed by stop()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.client = redis.Redis(port=self.port, socket_timeout=2.0)
            # SHUTDOWN with no retry: redis-py's default Retry (3, exponential backoff) would wait
            # seconds on a server that is gone, before the new one is started
            self.admin = redis.Redis(port=self.port, socket_timeout=2.0, retry=Retry(NoBackoff(), 0))
            self.process: subprocess.Popen[bytes] | None = None
            self.start()

        def start(self) -> float:
            """Start; return the seconds until it answers PING (and has loaded its dump)."""
            t0 = time.monotonic()
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
                stdout=self.log, stderr=subprocess.STDOUT)
            deadline = t0 + 10
            while True:
                try:
                    if self.admin.ping():
                        return time.monotonic() - t0
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.002)

        def restart_saved(self) -> dict[str, float]:
            """SHUTDOWN SAVE, then a new server on the same port from the dump."""
            t0 = time.monotonic()
            try:
                self.admin.shutdown(save=True)
            except redis.exceptions.ConnectionError:
                pass  # the server closes the connection as it exits
            assert self.process is not None
            self.process.wait(timeout=10)
            down = time.monotonic() - t0
            up = self.start()
            return {"shutdown_s": down, "start_s": up, "total_s": time.monotonic() - t0}

        def stop(self) -> None:
            terminate(self.process, timeout=10)
            self.log.close()

    def post(base: str, path: str, user: str) -> tuple[float, float, int, str | None]:
        req = urllib.request.Request(f"{base}{path}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json", "X-User": user})
        t0 = time.time()
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
                return t0, time.time(), int(r.status), r.headers.get("X-Claude-Degraded")
        except urllib.error.HTTPError as exc:
            exc.read()
            return t0, time.time(), int(exc.code), exc.headers.get("X-Claude-Degraded")
        except OSError as exc:
            return t0, time.time(), -1, type(exc).__name__

    def read_jsonl(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def global_key(client: Any) -> tuple[str | None, int, int]:
        keys = [k.decode() for k in client.scan_iter(match="{fc:flask-claude}:usd:global:day:*")
                if not k.decode().endswith(("|t",)) and "|alert|" not in k.decode()]
        if not keys:
            return None, 0, 0
        key = sorted(keys)[-1]
        spent, held = client.hmget(key, "spent", "held")
        return key, int(spent or 0), int(held or 0)

    def start_app(server: DrillRedis, tag: str, *, budget: float, failure: str) -> tuple[Gunicorn, Path, Path]:
        log_path, pid_log = tmp_root / f"{tag}.jsonl", tmp_root / f"{tag}.pid.jsonl"
        app = Gunicorn("restart_drill:create_app()", {
            "DRILL_REDIS_URL": server.url, "DRILL_LOG_PATH": str(log_path), "DRILL_PID_LOG": str(pid_log),
            "DRILL_BUDGET_USD": repr(budget), "DRILL_FAILURE": failure, "DRILL_SIM_LATENCY": repr(LATENCY),
            "BENCH_TMP": str(tmp_root)}, workers=WORKERS, threads=THREADS)
        return app, log_path, pid_log

    def per_pid(pid_log: Path, events: set[str]) -> dict[int, Counter[str]]:
        out: dict[int, Counter[str]] = defaultdict(Counter)
        for e in read_jsonl(pid_log):
            if e["event"] in events:
                out[e["pid"]][e["event"]] += 1
        return dict(out)

    def spend_check(log_path: Path, client: Any) -> list[str]:
        calls = [e for e in read_jsonl(log_path) if e["event"] in ("claude_api_call", "claude_api_error")]
        micro = sum(math.ceil(round(e["cost_usd"] * 1_000_000, 6)) for e in calls)
        key, spent, held = global_key(client)
        return [f"global budget key {key}: Redis spent {spent} micro-USD, held {held} (0 expected after a clean "
                f"stop: every call settled)",
                f"log: {len(calls)} calls, sum of cost_usd rounded up per call {micro} micro-USD; "
                f"Redis - log = {spent - micro:+d} micro-USD"
                + (f" (= {(spent - micro) / (micro / len(calls)):+.2f} calls)" if calls and micro else "")]

    def window_max(times: list[float], width: float = 60.0) -> tuple[int, float]:
        """Most events in any half-open window of ``width`` s, and the shortest span of 6 in a row."""
        times = sorted(times)
        best, j = 0, 0
        for i in range(len(times)):
            while times[i] - times[j] >= width:
                j += 1
            best = max(best, i - j + 1)
        span6 = min((times[i + 5] - times[i] for i in range(len(times) - 5)), default=float("inf"))
        return best, span6

    def burst_load(base: str, seconds: float, event_at: float, event: Any) -> tuple[list[tuple[Any, ...]], Any]:
        """USERS users, a burst of BURST each every ~1 s; ``event()`` runs ``event_at`` s in."""
        results: list[tuple[Any, ...]] = []
        lock = threading.Lock()
        pool = ThreadPoolExecutor(max_workers=USERS * BURST + 8)
        t_start = time.monotonic()
        stop = t_start + seconds

        def one(user: str) -> None:
            r = post(base, "/ask", user)
            with lock:
                results.append((user, *r))

        def user_loop(u: int) -> None:
            user = f"user-{u}"
            next_at = t_start + u / USERS  # staggered: a burst every 1/USERS s overall
            while next_at < stop:
                time.sleep(max(0.0, next_at - time.monotonic()))
                for _ in range(BURST):
                    pool.submit(one, user)
                next_at += 1.0

        loops = [threading.Thread(target=user_loop, args=(u,)) for u in range(USERS)]
        for t in loops:
            t.start()
        time.sleep(max(0.0, t_start + event_at - time.monotonic()))
        event_t = time.time()
        event_info = event()
        for t in loops:
            t.join(timeout=seconds + 30)
        pool.shutdown(wait=True)
        return results, (event_t, event_info)

    def report_bursts(results: list[tuple[Any, ...]], event_t: float, log_path: Path) -> list[str]:
        """Per user: the 200s counted by the client (send times) and, more precisely, by the server's
        call lines (the call's start: its line's ts minus latency_ms, a few ms after the admission)."""
        from datetime import datetime

        lines = []
        statuses = Counter((r[3], r[4]) for r in results)
        lines.append(f"{len(results)} requests: " + ", ".join(f"{s}{'/' + d if d else ''}: {n}"
                                                           for (s, d), n in sorted(statuses.items(),
                                                                                   key=lambda x: str(x))))
        starts: dict[str, list[float]] = defaultdict(list)
        for e in read_jsonl(log_path):
            if e["event"] == "claude_api_call":
                starts[e["user"]].append(datetime.fromisoformat(e["ts"]).timestamp() - e["latency_ms"] / 1000)
        rows = []
        for u in sorted({r[0] for r in results}):
            mine = [r for r in results if r[0] == u]
            ok = [r for r in mine if r[3] == 200]
            by_send, _ = window_max([r[1] for r in ok], 59.9)
            by_server, span6 = window_max(starts.get(u, []), 59.9)
            near = [r for r in ok if event_t - 1 <= r[1] <= event_t + 3]
            rows.append([u, len(mine), len(ok), len(starts.get(u, [])), by_send, by_server,
                         f"{span6:.3f}" if span6 != float("inf") else "-", len(near),
                         sum(1 for r in mine if r[3] == 503), sum(1 for r in mine if r[3] == 429)])
        lines.append(table(rows, ["user", "sent", "200", "call lines", "max 200s in 59.9 s (client send t)",
                                  "(server call start)", "min span of 6 calls s", "200s sent -1..+3 s of event",
                                  "503", "429"]))
        lines.append("  (a limit of 5/minute is kept when the shortest span of 6 consecutive admitted calls is "
                     ">= 60 s; the 59.9 s window leaves 100 ms for the admission-to-call gap and client timing)")
        lat = [(r[2] - r[1]) * 1000 for r in results]
        lines.append(f"latency ms: p50 {percentile(lat, 50):.0f}, p99 {percentile(lat, 99):.0f}, "
                     f"max {max(lat):.0f}")
        return lines

    def storage_lines(pid_log: Path) -> list[str]:
        counts = per_pid(pid_log, WATCH - {"claude_api_call"})
        calls = per_pid(pid_log, {"claude_api_call"})
        pids = sorted(set(counts) | set(calls))
        names = ["storage_unavailable", "storage_recovered", "spend_replayed", "storage_data_lost",
                 "storage_not_persistent", "budget_alert", "claude_api_error"]
        rows = [[pid, calls.get(pid, Counter())["claude_api_call"],
                 *[counts.get(pid, Counter())[n] for n in names]] for pid in pids]
        out = [table(rows, ["worker pid", "calls", *names])]
        for e in read_jsonl(pid_log):
            if e["event"] in ("storage_unavailable", "storage_recovered", "spend_replayed", "storage_data_lost"):
                extra = {k: v for k, v in e.items() if k not in ("pid", "event", "ts")}
                out.append(f"  {e['ts']} pid {e['pid']} {e['event']} {extra}")
        return out

    # ---------------------------------------------------------------- A and B
    def part_ab(label: str, failure: str, action: str) -> None:
        server = DrillRedis(f"{label}-{failure}")
        try:
            app, log_path, pid_log = start_app(server, f"{label}-{failure}", budget=1000.0, failure=failure)
            try:
                def event() -> Any:
                    if action == "restart":
                        return server.restart_saved()
                    infos = []
                    for k in range(KILLS):
                        if k:
                            time.sleep(4.0)
                        infos.append(int(server.client.execute_command("CLIENT", "KILL", "TYPE", "normal")))
                    return {"killed_connections": infos}
                results, (event_t, info) = burst_load(app.base, LOAD_S, LOAD_S / 2 - (4 * (KILLS - 1) / 2
                                                                                   if action == "kill" else 0), event)
            finally:
                app.stop()  # graceful: every worker writes what waits (atexit)
            print(f"\n== {label}: {action} mid-run, CLAUDE_STORAGE_FAILURE={failure!r}: {USERS} users x "
                  f"{BURST}-request bursts every ~1 s for {LOAD_S:.0f} s, 5/minute per user, "
                  f"{WORKERS} workers x {THREADS} threads, simulator latency {LATENCY * 1000:.0f} ms ==")
            print(f"{action} at t={event_t:.3f}: {info}")
            for line in report_bursts(results, event_t, log_path):
                print(line)
            for line in storage_lines(pid_log):
                print(line)
            for line in spend_check(log_path, server.client):
                print(line)
        finally:
            server.stop()

    # ---------------------------------------------------------------- C
    def call_cost() -> float:
        """One /spend call's cost, in-process on memory:// (same model, prompt, max_tokens, simulator)."""
        os.environ.update({"DRILL_REDIS_URL": "memory://", "DRILL_LOG_PATH": str(tmp_root / "calib.jsonl"),
                           "DRILL_PID_LOG": str(tmp_root / "calib.pid.jsonl"), "DRILL_BUDGET_USD": "100",
                           "DRILL_SIM_LATENCY": "0"})
        app = create_app()
        with app.test_client() as c:
            for _ in range(3):
                assert c.post("/spend", json={}).status_code == 200
        from loguru import logger
        logger.remove()
        costs = [e["cost_usd"] for e in read_jsonl(tmp_root / "calib.jsonl") if e["event"] == "claude_api_call"]
        return max(costs)

    def part_c() -> None:
        cost = call_cost()
        micro_call = math.ceil(cost * 1_000_000)
        budget = round(micro_call * C_CALLS / 1_000_000, 6)
        server = DrillRedis("C")
        results: list[tuple[Any, ...]] = []
        flush_info: dict[str, Any] = {}
        try:
            app, log_path, pid_log = start_app(server, "C", budget=budget, failure="open")
            try:
                lock = threading.Lock()
                stop = threading.Event()
                t_start = time.monotonic()

                def client(i: int) -> None:
                    while not stop.is_set():
                        r = post(app.base, "/spend", f"c-{i}")
                        with lock:
                            results.append(r)

                threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
                for t in threads:
                    t.start()
                watcher = redis.Redis(port=server.port, socket_timeout=2.0)
                limit = budget * 1_000_000
                while time.monotonic() - t_start < C_MAX_S:  # the FLUSHALL at 75%
                    _, spent, held = global_key(watcher)
                    if spent >= 0.75 * limit:
                        flush_info = {"t": time.time(), "spent_before": spent, "held_before": held,
                                      "fraction": spent / limit, "after_s": time.monotonic() - t_start}
                        watcher.flushall()
                        break
                    time.sleep(0.01)
                samples = []
                while time.monotonic() - t_start < C_MAX_S:  # until the budget refuses for 3 s
                    time.sleep(0.25)
                    _, spent, held = global_key(watcher)
                    samples.append((time.time(), spent, held))
                    with lock:
                        recent = [r for r in results if r[1] > time.time() - 3]
                    if (flush_info and len(recent) > 10
                            and all(r[3] == "budget_exhausted" for r in recent)):
                        break
                stop.set()
                for t in threads:
                    t.join(timeout=40)
            finally:
                app.stop()
            events = read_jsonl(log_path)
            print(f"\n== C: FLUSHALL at 75% of the daily budget under load: {CLIENTS} client threads back to back "
                  f"on /spend, budget ${budget} = {C_CALLS} calls of {micro_call} micro-USD, "
                  f"CLAUDE_STORAGE_FAILURE='open', {WORKERS} workers x {THREADS} threads ==")
            if flush_info:
                after = [s for s in samples if s[0] > flush_info["t"]][:4]
                print(f"FLUSHALL {flush_info['after_s']:.1f} s in, Redis spent {flush_info['spent_before']} "
                      f"({flush_info['fraction'] * 100:.1f}%), held {flush_info['held_before']}; spent/held "
                      f"sampled after: {[(round(s[0] - flush_info['t'], 2), s[1], s[2]) for s in after]}")
            else:
                print("FLUSHALL never ran: the load did not reach 75% within the time cap")
            statuses = Counter((r[2], r[3]) for r in results)
            print(f"{len(results)} requests: " + ", ".join(f"{s}{'/' + str(d) if d else ''}: {n}"
                                                           for (s, d), n in sorted(statuses.items(), key=str)))
            for line in storage_lines(pid_log):
                print(line)
            alerts = Counter((e.get("budget"), e.get("threshold")) for e in events if e["event"] == "budget_alert")
            print("budget_alert lines per (budget, threshold): "
                  + ", ".join(f"{b} {t}: {n}" for (b, t), n in sorted(alerts.items(), key=str))
                  + ("  DUPLICATE" if any(n > 1 for n in alerts.values()) else "  (each once)"))
            for e in events:
                if e["event"] == "budget_alert":
                    print(f"  {e['ts']} {e['budget']} threshold {e['threshold']} spent {e['spent']} limit {e['limit']}")
            calls = [e for e in events if e["event"] in ("claude_api_call", "claude_api_error")]
            log_micro = sum(math.ceil(round(e["cost_usd"] * 1_000_000, 6)) for e in calls)
            _, spent, held = global_key(server.client)
            limit_micro = round(budget * 1_000_000)
            print(f"budget {limit_micro} micro-USD; Redis spent {spent} ({(spent - limit_micro) / micro_call:+.2f} "
                  f"calls vs the budget), held {held}; log {len(calls)} calls = {log_micro} micro-USD "
                  f"({(log_micro - limit_micro) / micro_call:+.2f} calls vs the budget, "
                  f"{(log_micro - spent) / micro_call:+.2f} calls more than Redis counts)")
            ordered = sorted(results, key=lambda r: r[1])
            best = (0, 0.0, 0.0)
            run: list[tuple[Any, ...]] = []
            for r in ordered:
                if r[2] == 503 and r[3] == "budget_busy":
                    run.append(r)
                    if len(run) > best[0]:
                        best = (len(run), run[0][1], r[1])
                else:
                    run = []
            busy = [r for r in results if r[3] == "budget_busy"]
            first_exhausted = min((r[1] for r in results if r[3] == "budget_exhausted"), default=None)
            print(f"budget_busy answers: {len(busy)}; longest run of consecutive (by send time) 503 budget_busy: "
                  f"{best[0]} answers over {best[2] - best[1]:.2f} s"
                  + (f", starting {best[1] - flush_info['t']:+.2f} s from the FLUSHALL" if flush_info and best[0]
                     else ""))
            if first_exhausted is not None and flush_info:
                print(f"first budget_exhausted sent {first_exhausted - flush_info['t']:.2f} s after the FLUSHALL")
            for line in spend_check(log_path, server.client):
                print(line)
        finally:
            server.stop()

    # ---------------------------------------------------------------- D
    def part_d() -> None:
        import httpx2
        from anthropic._constants import DEFAULT_CONNECTION_LIMITS
        from flask import Flask
        from loguru import logger

        from flask_claude import Claude, ai_feature, fallback_to
        from flask_claude.flags import StaticFlags
        from flask_claude.simulator import Simulator

        logger.remove()

        def measure(label: str, storage: str, *, loopback: bool, transport: Any = None) -> list[Any]:
            counting = {"now": 0, "max": 0, "in_view": 0, "max_view": 0}
            lock = threading.Lock()

            def wrap(sim: Any) -> None:
                inner = sim.wsgi_app

                def counted(environ: Any, start_response: Any) -> Any:
                    with lock:
                        counting["now"] += 1
                        counting["max"] = max(counting["max"], counting["now"])
                    try:
                        return inner(environ, start_response)  # the latency is spent before this returns
                    finally:
                        with lock:
                            counting["now"] -= 1
                sim.wsgi_app = counted

            served = None
            app = Flask(f"cap_{label}")
            app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=[MODEL], CLAUDE_STORAGE_URI=storage,
                              CLAUDE_MAX_RETRIES=0, CLAUDE_FLAGS=StaticFlags(),
                              CLAUDE_LOG_PATH=str(tmp_root / "d.jsonl"))
            if loopback:
                sim = Simulator()
                sim.latency(D_LATENCY)
                wrap(sim)
                served = sim.serve()
                app.config["CLAUDE_BASE_URL"] = served.url
            claude = Claude(app, **({"http_transport": transport} if transport is not None else {}))
            state = app.extensions["claude"]
            if not loopback:
                state.simulator.latency(D_LATENCY)
                wrap(state.simulator)

            @app.post("/spend")
            @ai_feature("spend")
            @fallback_to({"text": None}, status=503)
            def spend() -> Any:
                with lock:
                    counting["in_view"] += 1
                    counting["max_view"] = max(counting["max_view"], counting["in_view"])
                try:
                    msg = claude.messages.create(model=MODEL, max_tokens=MAX_TOKENS,
                                                 messages=[{"role": "user", "content": PROMPT}])
                    return {"text": getattr(msg.content[0], "text", None)}
                finally:
                    with lock:
                        counting["in_view"] -= 1

            pool_info = "-"
            store = getattr(state.store, "inner", state.store)
            if hasattr(store, "client"):
                cp = store.client.connection_pool
                pool_info = f"{type(cp).__name__}(max_connections={cp.max_connections})"
            inner_t = state.client._client._transport.inner  # DeadlineTransport -> the transport in use
            pool = getattr(inner_t, "_pool", None)
            http_info = (f"{type(inner_t).__name__}(max_connections={pool._max_connections})"
                         if pool is not None else type(inner_t).__name__)
            answering = served.simulator if served is not None else state.simulator
            with app.test_client() as warm:  # first-contact work out of the measurement
                answering.latency(0)
                warm.post("/spend", json={})
                answering.latency(D_LATENCY)
            statuses: Counter[int] = Counter()
            lat: list[float] = []
            barrier = threading.Barrier(THREADS_D)

            def worker() -> None:
                with app.test_client() as c:
                    barrier.wait(timeout=60)
                    t0 = time.perf_counter()
                    status = c.post("/spend", json={}).status_code
                    with lock:
                        statuses[status] += 1
                        lat.append(time.perf_counter() - t0)

            t0 = time.monotonic()
            threads = [threading.Thread(target=worker) for _ in range(THREADS_D)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            wall = time.monotonic() - t0
            if served is not None:
                served.shutdown()
            state.store.flush()
            waves = Counter(round(x / D_LATENCY) for x in lat)
            return [label, storage.split(":")[0], http_info, pool_info, THREADS_D, counting["max_view"],
                    counting["max"], f"{wall:.1f}", dict(sorted(waves.items())), dict(statuses)]

        server = DrillRedis("D")
        try:
            rows = [
                measure("in-process simulator", "memory://", loopback=False),
                measure("in-process simulator", server.url, loopback=False),
                measure("loopback simulator, default transport", "memory://", loopback=True),
                measure("loopback simulator, default transport", server.url, loopback=True),
                measure("loopback, http_transport max_connections=1000", server.url, loopback=True,
                        transport=httpx2.HTTPTransport(limits=httpx2.Limits(max_connections=1000,
                                                                            max_keepalive_connections=100))),
            ]
        finally:
            server.stop()
        print(f"\n== D: calls in flight in one process: {THREADS_D} threads, one request each, started together, "
              f"simulator latency {D_LATENCY:g} s ==")
        print(table(rows, ["way to the simulator", "storage", "Claude HTTP transport", "Redis pool", "threads",
                           "max in view", "max at simulator", "wall s", "answer time / latency (rounded): answers",
                           "statuses"]))
        print(f"httpx2 default limits: {httpx2._config.DEFAULT_LIMITS!r}  (httpx2._config.DEFAULT_LIMITS; "
              f"HTTPTransport() without limits= uses it)")
        print(f"anthropic DEFAULT_CONNECTION_LIMITS: {DEFAULT_CONNECTION_LIMITS!r}  (applied by DefaultHttpxClient "
              f"only to a transport it builds itself; flask-claude passes its own transport)")

    print(f"restart drill; tmp {tmp_root}")
    try:
        if "A" in parts:
            for failure in POLICIES:
                part_ab("A", failure, "restart")
        if "B" in parts:
            part_ab("B", "open", "kill")
        if "C" in parts:
            part_c()
        if "D" in parts:
            part_d()
    finally:
        print("\n== machine ==")
        print(machine_description())
        print(f"command: {sys.executable} bench/restart_drill.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
