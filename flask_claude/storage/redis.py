"""The shared store: Redis, every step one Lua script (``lua/*.lua``), so atomic.

Settlements are written behind: they ride in the next step's round trip (see ``RedisStore``), and so
do the monitoring rollups, summed in the worker and sent at most once per flush interval
(``rollups.py``). On a plain ``redis://`` the scripts go over ``wire.py``'s socket per thread
instead of redis-py.
"""

from __future__ import annotations

import atexit
import math
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import process
from .pacing import RedisPacing
from .records import (
    Begin,
    BreakerParams,
    Crossed,
    Line,
    Outcome,
    SettleDone,
    StorageUnavailable,
)
from .rollups import RedisRollups
from .scripts import lua
from .wire import Call, Frame, LeanScripts, NotSent, expand
from .wire import usable as lean_usable

MAX_PENDING = 256  # settlements waiting at most: past this one is sent at once
FLUSHER_IDLE_S = 5.0  # a flusher thread with nothing to send for this long ends
# Packed script frames kept: a subject's plan has two or three (begin, settle, an admission alone), so
# this follows budget.py's plan cache (10,000 subjects), at ~1 KB a frame; past it the cache starts over.
MAX_FRAMES = 30_000


@dataclass
class _Pending:
    call: Call
    lines: Sequence[Line]
    done: SettleDone
    since: float
    record: bool = False  # a pacing record riding the same round trip: nobody waits for its reply


class RedisStore:
    """The shared store: every operation is one Lua script, so one round trip and atomic.

    A settlement is written behind (``settle_later``): it rides in the same round trip as the next
    ``begin`` of this process, or is sent by a flusher thread within ``settle_delay`` seconds when
    no request comes, and at exit. Until it lands its hold stays, so a budget only looks fuller
    (never emptier) for those milliseconds. A call's rollup increments are not part of its
    settlement: they are summed in ``self.rollups`` and ride along, as one script, on the first
    round trip after they are due (the flusher thread sends them when no request comes), and on
    every ``flush``.
    """

    def __init__(self, uri: str, *, prefix: str, socket_timeout: float, settle_delay: float = 0.05,
                 spin: float = 0.0) -> None:
        import redis
        from limits.storage import storage_from_string

        options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        if uri.startswith(("redis+sentinel", "valkey+sentinel")):
            options = {"socket_timeout": socket_timeout}
        self._limits_storage = storage_from_string(uri, **options)
        self.client: Any = self._limits_storage.storage  # type: ignore[union-attr]
        self.tag = f"{{fc:{prefix}}}"
        # Any Redis error (OOM, READONLY during a failover, CLUSTERDOWN, a non-Redis peer) is an outage
        # for CLAUDE_STORAGE_FAILURE to decide, never a 500.
        self._errors = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self._begin = self.client.register_script(lua("functions", "begin"))
        self._settle = self.client.register_script(lua("functions", "settle"))
        self._allow = self.client.register_script(lua("breaker_allow"))
        self._record = self.client.register_script(lua("functions", "breaker_record"))
        self._lean = LeanScripts(self.client, socket_timeout, spin) if lean_usable(self.client) else None
        self._cluster = isinstance(self.client, redis.cluster.RedisCluster)
        self._reply_errors = (redis.exceptions.ResponseError,)
        self._settle_delay = settle_delay
        self._pending: list[_Pending] = []
        self._pending_lock = threading.Lock()
        self._landed = threading.Condition(self._pending_lock)  # no settlement in flight any more
        self._in_flight = 0
        self._flushing = 0  # threads in flush() waiting for _landed (nobody else waits: no notify)
        self._socket_timeout = socket_timeout
        self._flush_wakeup = threading.Event()
        self._flusher: tuple[int, threading.Thread] | None = None
        self._frames: dict[tuple[Any, ...], Frame] = {}
        _STORES.add(self)
        self.rollups = RedisRollups(self)
        self.pacing = RedisPacing(self)

    def _k(self, key: str) -> str:
        return f"{self.tag}:{key}"

    def _b(self, model: str) -> str:
        return f"{self.tag}:breaker:{model}"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    # --- scripts, several per round trip ------------------------------------------------------

    def _run(self, calls: Sequence[Call]) -> list[Any]:
        """Run scripts in one round trip: a reply each, or the exception that command raised."""
        if self._lean is not None:
            return self._lean.run(calls)
        calls = [expand(call) for call in calls]
        if self._cluster:  # redis-py's cluster pipelines refuse EVALSHA: one script after the other
            replies: list[Any] = []
            for script, keys, args in calls:
                try:
                    replies.append(script(keys=keys, args=args))
                except self._reply_errors as exc:
                    replies.append(exc)
            return replies
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        return list(pipe.execute(raise_on_error=False))

    def _run_with_pending(self, call: Call | None, *, all_rollups: bool = False) -> Any:
        """``call`` (if any) in the same round trip as every settlement waiting to be written, and the
        rollups waiting if they are due (any that wait, with ``all_rollups``)."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            rollup = self.rollups.take(force=all_rollups)
            sending = bool(pending) or rollup is not None
            if sending:
                self._in_flight += 1
        try:
            return self._send(pending, call, rollup)
        finally:
            if sending:
                with self._pending_lock:
                    self._in_flight -= 1
                    if not self._in_flight and self._flushing:
                        self._landed.notify_all()

    def _send(self, pending: list[_Pending], call: Call | None, rollup: Call | None = None) -> Any:
        # A failed rollup write (an error reply, or no reply) is dropped with its interval's counts:
        # only monitoring numbers, and a retry could count twice what a hung Redis still applies.
        calls: list[Call] = [p.call for p in pending]
        if rollup is not None:
            calls.append(rollup)
        if call is not None:
            calls.append(call)
        if not calls:
            return None
        try:
            replies = self._run(calls)
        except self._errors as exc:
            # Sent or not? A failure to connect or write means not; a reply that never came may
            # still be applied when a hung Redis resumes, so it is not replayed (no double count).
            sent = not isinstance(exc, NotSent | redis_connection_errors())
            for p in pending:
                p.done(None, "uncertain" if sent else "not_sent")
            raise StorageUnavailable(type(exc).__name__) from exc
        except Exception:
            # Not a storage error: the calls could not even be packed (a bug), so nothing was sent.
            # The settlements taken along are kept (replayed later), never silently dropped.
            for p in pending:
                p.done(None, "not_sent")
            raise
        for p, reply in zip(pending, replies, strict=False):
            if p.record:
                continue  # a pacing record: best effort, nobody waits for it
            if isinstance(reply, Exception):
                p.done(None, "not_sent")  # an error reply: the script did not run
            else:
                p.done(self._crossed(p.lines, reply), None)
        if call is None:
            return None
        reply = replies[-1]
        if isinstance(reply, Exception):
            raise StorageUnavailable(type(reply).__name__) from reply
        return reply

    def flush(self) -> None:
        """Write every settlement and every rollup increment still waiting (exit, a reader, or a test
        that looks at Redis), and wait (a bounded while) for those another thread of this process is
        sending right now."""
        self._send_waiting(all_rollups=True)
        with self._pending_lock:
            self._flushing += 1
            try:
                self._landed.wait_for(lambda: not self._in_flight, timeout=2 * self._socket_timeout + 1)
            finally:
                self._flushing -= 1

    def _send_waiting(self, *, all_rollups: bool = False) -> None:
        """One round trip of its own for what waits (the rollups only once due, unless ``all_rollups``)."""
        try:
            self._run_with_pending(None, all_rollups=all_rollups)
        except StorageUnavailable:
            pass  # each settlement's ``done`` was told; a rollup write is dropped

    def _flush_soon(self) -> None:
        """A flusher thread per process (a forked worker starts its own) for quiet moments; it ends
        after a quiet spell and the next settlement starts it again."""
        pid = process.pid()
        flusher = self._flusher
        if flusher is not None and flusher[0] == pid and self._flush_wakeup.is_set():
            return  # this process's flusher has a wake-up waiting already (it clears _flusher when it ends)
        with self._pending_lock:
            if self._flusher is None or self._flusher[0] != pid or not self._flusher[1].is_alive():
                thread = threading.Thread(target=self._flush_loop, name="flask-claude-settle", daemon=True)
                thread.start()  # first: a thread that could not start is never taken for a live flusher
                self._flusher = (pid, thread)
            self._flush_wakeup.set()

    def _flush_loop(self) -> None:
        try:
            self._flush_until_quiet()
        finally:  # whatever ends the thread, the next settlement starts another
            with self._pending_lock:
                if self._flusher is not None and self._flusher[1] is threading.current_thread():
                    self._flusher = None

    def _flush_until_quiet(self) -> None:
        while True:
            due = self.rollups.due_in()  # None: no rollup waits; else wake when it is due, if no one did
            if not self._flush_wakeup.wait(timeout=FLUSHER_IDLE_S if due is None else max(0.0, due)):
                if due is None:
                    with self._pending_lock:
                        if not self._flush_wakeup.is_set() and self.rollups.due_in() is None:
                            self._flusher = None
                            return
                    continue
            self._flush_wakeup.clear()
            time.sleep(self._settle_delay)  # a request that comes meanwhile takes them along for free
            self._send_waiting()

    def _frame(self, shape: tuple[Any, ...], build: Any) -> Frame:
        frame = self._frames.get(shape)
        if frame is None:
            if len(self._frames) >= MAX_FRAMES:
                self._frames.clear()
            frame = self._frames[shape] = build()
        return frame

    def begin(self, step: Begin, now: float) -> Outcome:
        gates, requests, holds = step.gates, step.requests, step.holds
        if step.downgrade_line >= 0 and len(step.alt_amounts) != len(holds):
            raise ValueError(f"{len(step.alt_amounts)} step-down amounts for {len(holds)} holds")
        # The frame (keys and the plan's fixed arguments) is cached by value, never by an object's id.
        shape = (len(gates), len(requests), tuple(step.breakers), step.optional_holds, step.downgrade_line,
                 step.downgrade_at, step.exhausted_alert, *[(li.key, li.limit, li.expires_at) for li in gates],
                 *[(li.key, li.limit, li.window) for li in requests],
                 *[(li.key, li.limit, li.expires_at) for li in holds])
        frame = self._frames.get(shape) or self._frame(shape, lambda: self._begin_frame(step))
        amounts = [line.amount for line in holds]
        args: list[Any] = [repr(now), step.member, step.rid, repr(step.hold_until), *amounts,
                           *(step.alt_amounts if step.downgrade_line >= 0 else amounts),
                           *[repr(now - line.window) for line in requests]]
        res = self._run_with_pending((frame, (), args))
        ok = bool(int(res[0]))
        stage = res[1].decode() if isinstance(res[1], bytes) else str(res[1])
        if not ok:
            return Outcome(False, stage, int(res[2]), busy=bool(int(res[6])), retry_after=float(res[3]),
                           newly_exhausted=bool(int(res[4])), spent=int(res[5]))
        nr = len(requests)
        breakers = {m: (float(v) if v else None) for m, v in zip(step.breakers, res[10 + 2 * nr:], strict=True)}
        return Outcome(True, "", -1, False, 0.0, tuple(res[10:10 + nr]),  # integer replies are ints already
                       tuple([float(x) for x in res[10 + nr:10 + 2 * nr]]), False, 0, breakers, res[7] == 1,
                       res[8] == 1, float(res[9]))

    def _begin_frame(self, step: Begin) -> Frame:
        keys = ([self._k(line.key) for line in (*step.gates, *step.requests, *step.holds)]
                + [self._b(m) for m in step.breakers])
        args: list[Any] = [len(step.gates), len(step.requests), len(step.holds), len(step.breakers),
                           step.exhausted_alert, "1" if step.optional_holds else "0", step.downgrade_line + 1,
                           repr(step.downgrade_at)]
        for line in step.gates:
            args += [line.limit, repr(line.expires_at)]
        for line in step.requests:
            args += [line.limit, repr(line.window), math.ceil(line.window) + 1]
        for line in step.holds:
            args += [line.limit, repr(line.expires_at)]
        return Frame(self._begin, keys, args, 4 + 2 * len(step.holds) + len(step.requests))

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None,
               rollup: dict[str, int] | None = None, seen_closed: bool = False) -> list[Crossed]:
        """At once; the ``rollup`` is still summed and written with the others (``settle_later``)."""
        if rollup:
            self.rollups.add(rollup, now)
            self._flush_soon()
        script, keys, args = expand(self._settle_call(lines, rids, thresholds, now, success, breaker, seen_closed))
        return self._crossed(lines, self._call(script, keys=keys, args=args))

    def settle_later(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     done: SettleDone, success: str | None = None, breaker: BreakerParams | None = None,
                     rollup: dict[str, int] | None = None, seen_closed: bool = False) -> None:
        """``settle``, written behind: ``done(crossed, failure)`` is called once it was sent. The
        ``rollup`` is summed into the worker's rollups (written once due); a step that is only a
        rollup (no budget line, no success to record) sends nothing of its own and is done at once."""
        if rollup:
            self.rollups.add(rollup, now)
        if not lines and (success is None or breaker is None):
            done([], None)
            if rollup:
                self._flush_soon()
            return
        call = self._settle_call(lines, rids, thresholds, now, success, breaker, seen_closed)
        with self._pending_lock:
            self._pending.append(_Pending(call, lines, done, time.monotonic()))
            full = len(self._pending) >= MAX_PENDING
        if full:
            self._send_waiting()
        else:
            self._flush_soon()

    def later(self, script: Any, keys: list[str], args: list[Any]) -> None:
        """A pacing record (``storage/pacing.py``), written behind like a settlement and with it."""
        with self._pending_lock:
            self._pending.append(_Pending((script, keys, args), (), _no_done, time.monotonic(), record=True))
            full = len(self._pending) >= MAX_PENDING
        if full:
            self._send_waiting()
        else:
            self._flush_soon()

    def _admit_now(self, call: Call) -> Any:
        """A pacing admission: synchronous, after this process's records waiting to be written."""
        return self._run_with_pending(call)

    def _crossed(self, lines: Sequence[Line], res: Any) -> list[Crossed]:
        return [Crossed(lines[int(i)].key, float(t), int(spent), lines[int(i)].limit) for i, t, spent in res]

    def _settle_call(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     success: str | None, breaker: BreakerParams | None, seen_closed: bool) -> Call:
        record = success is not None and breaker is not None
        if not record:
            success = breaker = None
        shape = (tuple(thresholds), success, *((breaker.min_calls, breaker.failure_rate, breaker.window,
                                                 breaker.cooldown) if breaker is not None else ()),
                 *[(li.key, li.limit, li.expires_at) for li in lines])
        frame = self._frames.get(shape) or self._frame(shape, lambda: self._settle_frame(lines, thresholds, success,
                                                                                          breaker))
        return frame, (), [repr(now), " ".join(rids), "1" if seen_closed else "0", *[li.amount for li in lines]]

    def _settle_frame(self, lines: Sequence[Line], thresholds: Sequence[float], success: str | None,
                      breaker: BreakerParams | None) -> Frame:
        keys = [self._k(line.key) for line in lines]
        args: list[Any] = [len(thresholds), *(repr(t) for t in thresholds), len(lines)]
        for line in lines:
            args += [line.limit, repr(line.expires_at)]
        if success is not None and breaker is not None:
            keys.append(self._b(success))
            args += [breaker.min_calls, repr(breaker.failure_rate), repr(breaker.window), repr(breaker.cooldown)]
        return Frame(self._settle, keys, args, 3 + len(lines))

    def ping(self) -> None:
        """A cheap check that storage answers again (the outage guard's probe)."""
        self._call(self.client.ping)

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        out = []
        for key in keys:
            fields = self._call(self.client.hgetall, self._k(key))
            reserved = 0
            for name, value in fields.items():
                if name.startswith(b"r:"):
                    amount, until = value.split()
                    if float(until) > now:
                        reserved += int(amount)
            out.append((int(fields.get(b"spent", 0)), reserved))
        return out

    def put_record(self, key: str, value: str, ttl: float) -> None:
        self._call(self.client.set, self._k(f"record:{key}"), value, ex=max(1, math.ceil(ttl)))

    def get_record(self, key: str) -> str | None:
        value = self._call(self.client.get, self._k(f"record:{key}"))
        return None if value is None else value.decode()

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool:
        return bool(self._call(self._allow, keys=[self._b(key)], args=[repr(now), repr(cooldown)]))

    def breaker_record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool:
        args = [repr(now), "1" if ok else "0", params.min_calls, repr(params.failure_rate), repr(params.window),
                repr(params.cooldown)]
        return bool(self._call(self._record, keys=[self._b(key)], args=args))

    def breaker_state(self, key: str, now: float) -> str:
        open_until = self._call(self.client.hget, self._b(key), "open_until")
        if open_until is None:
            return "closed"
        return "open" if now < float(open_until) else "half_open"


def _no_done(crossed: Any, failure: str | None) -> None:
    return None


_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


@atexit.register
def flush_all() -> None:
    """A worker stopping cleanly (gunicorn's graceful exit, ``sys.exit``) writes what is waiting:
    settlements, and the rollup increments summed since their last write."""
    for store in list(_STORES):
        store.flush()


def redis_connection_errors() -> type[BaseException]:
    import redis

    return redis.exceptions.ConnectionError
