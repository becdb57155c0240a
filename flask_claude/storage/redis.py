"""The shared store: Redis through redis-py, every step one Lua script (``lua/*.lua``), so atomic.

Scripts are sent as ``EVALSHA`` in a pipeline of redis-py's (a script Redis does not know yet is
loaded and run again: it never ran), so a request's step and the settlements waiting to be written
share one round trip on every deployment shape: ``redis://``, ``rediss://``, ``unix://``, Sentinel
(redis-py's sentinel-managed client) and Cluster (every key of one app shares a hash tag, so the
pipeline goes to the node that serves it). redis-py's own ``Script`` objects in a pipeline would ask
``SCRIPT EXISTS`` before every execute: one more round trip per request.

Trust before speed:

- A connection the server closed (restart, failover, idle timeout, ``CLIENT KILL``) is retried once on
  a fresh one (redis-py's ``Retry``, on connection errors only: a command that timed out may still
  run, so it is not sent again) before anything counts as an outage (``guard.py``).
- A settlement is written behind and kept until it lands. Each carries its hold's id, and Redis
  marks the call settled (``lua/functions.lua``), so a settlement sent again after a reply that never
  came is applied at most once.
- The app's data-loss marker (``epoch``) makes a flushed or emptied Redis visible: every worker then
  puts back the spend it settled this period (its ledger) before its next step counts, and the alert
  thresholds that spend passes are claimed without being sent again.
"""

from __future__ import annotations

import atexit
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import process
from .connection import config_of, persists, reconnect_retry
from .ledger import Ledger, Spent
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

MAX_PENDING = 256  # settlements waiting at most before one is sent at once (not while storage is away)
MAX_OWED = 10_000  # settlements kept while storage is away; past this they are handed back as not sent
FLUSHER_IDLE_S = 5.0  # a flusher thread with nothing to send for this long ends
MAX_FRAMES = 30_000  # plans' packed keys and fixed arguments kept (three a subject: see budget.py)
RESTORE_BATCH = 64  # budget keys put back per script call after a data loss
WATCH_S = 1.0  # how often a process with spend to put back looks for a data loss when idle
OWED_RETRY_MAX_S = 5.0  # the longest a flusher waits between sends of settlements storage did not take

Notify = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class Call:
    """One script to run: keys and arguments as Redis gets them. ``epoch`` calls are guarded by the
    data-loss marker, whose key and values are added when the call is sent (they may change while a
    settlement waits)."""

    script: Any  # redis-py ``Script`` (its ``sha`` and source)
    keys: Sequence[Any]
    args: Sequence[Any]
    epoch: bool = False


@dataclass(slots=True)
class Frame:
    """A plan's keys and fixed arguments, built once per plan shape: a request adds only its own."""

    script: Any
    keys: list[str]
    args: list[Any]

    def call(self, own: Sequence[Any]) -> Call:
        return Call(self.script, self.keys, [*self.args, *own], epoch=True)


@dataclass(slots=True)
class _Pending:
    call: Call
    lines: Sequence[Line]
    done: SettleDone
    thresholds: Sequence[float] = ()
    record: bool = False  # a pacing record riding the same round trip: best effort, never kept


def _is(reply: Any, word: bytes) -> bool:
    return isinstance(reply, list) and len(reply) >= 1 and reply[0] == word


class RedisStore:
    """The shared store: every operation is one Lua script, so one round trip and atomic.

    A settlement is written behind (``settle_later``): it rides in the same round trip as the next
    ``begin`` of this process, or is sent by a flusher thread within ``settle_delay`` seconds when
    no request comes, and at exit. Until it lands its hold stays, so a budget only looks fuller
    (never emptier) meanwhile. While storage is away settlements are kept (up to ``MAX_OWED``) and
    ride on the first round trip that works: a request's, or the outage guard's probe. A call's
    rollup increments are summed in ``self.rollups`` and ride along, as one script, on the first
    round trip after they are due.
    """

    def __init__(self, uri: str, *, prefix: str, socket_timeout: float, settle_delay: float = 0.05,
                 options: dict[str, Any] | None = None, notify: Notify | None = None) -> None:
        import redis
        from limits.storage import storage_from_string

        connection: dict[str, Any] = {
            "socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
            # Only when the connection failed, never after a timeout (Redis may still run what timed
            # out): a closed socket is reopened at once; a server that refuses (it is restarting) is
            # asked twice more within RESTART_WAITS. Every script is safe to run twice: a step finds
            # its own request and holds, a settlement or a restore its own id.
            "retry": reconnect_retry(),
        }
        if uri.startswith(("redis+sentinel", "valkey+sentinel")):
            del connection["socket_connect_timeout"]
        connection.update(options or {})
        if uri.startswith("unix://"):  # redis-py's spelling of a unix socket; limits names it redis+unix
            uri = "redis+" + uri
        self._limits_storage = storage_from_string(uri, **connection)
        self.client: Any = self._limits_storage.storage  # type: ignore[union-attr]
        self.tag = f"{{fc:{prefix}}}"
        self._notify = notify
        # Any Redis error (OOM, READONLY during a failover, CLUSTERDOWN, a non-Redis peer) is an outage
        # for CLAUDE_STORAGE_FAILURE to decide, never a 500.
        self._errors = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self._no_script = redis.exceptions.NoScriptError
        self._moved = (redis.exceptions.MovedError, redis.exceptions.AskError)
        self._cluster = isinstance(self.client, redis.cluster.RedisCluster)
        register = self.client.register_script
        self._begin = register(lua("functions", "begin"))
        self._settle = register(lua("functions", "settle"))
        self._restore_script = register(lua("functions", "restore"))
        self._usage = register(lua("functions", "usage"))
        self._epoch_script = register(lua("epoch"))
        self._allow = register(lua("breaker_allow"))
        self._record = register(lua("functions", "breaker_record"))
        self._settle_delay = settle_delay
        self._socket_timeout = socket_timeout
        self._pending: list[_Pending] = []
        self._pending_lock = threading.Lock()
        self._landed = threading.Condition(self._pending_lock)  # no settlement in flight any more
        self._in_flight = 0
        self._flushing = 0  # threads in flush() waiting for _landed (nobody else waits: no notify)
        self._owing = False  # a send failed: what waits rides on the next round trip that works
        self._flush_wakeup = threading.Event()
        self._flusher: tuple[int, threading.Thread] | None = None
        self._frames: dict[tuple[Any, ...], Frame] = {}
        # The data-loss marker: the value this process knows (None before its first step), and the
        # one it proposes when Redis has none.
        self._epoch_key = f"{self.tag}:epoch"
        self._epoch: bytes | None = None
        self._proposal = os.urandom(8).hex()
        self._epoch_lock = threading.Lock()
        self._ledger = Ledger()
        self._ledger_lock = threading.Lock()
        self._now = 0.0  # the latest time a step was given (the app's clock): a restore runs on it
        self._watcher: tuple[int, threading.Thread] | None = None
        self._closed = False
        self._restoring = False  # a thread is putting the ledger back (see ``_remember``)
        self._stepped = 0.0  # monotonic time of the last round trip (the watcher asks only when idle)
        self.persistence: dict[str, str] | None = None  # what the server said at first contact
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

    # --- commands, several per round trip -------------------------------------------------------

    def _execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """One round trip: a reply each, or the error reply that command got."""
        if not self._cluster:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute(raise_on_error=False))
        # Cluster: every key of the app shares one hash tag, so one node serves them all. A slot that
        # moved (resharding, a failover) refreshes the map, and the commands it refused run again.
        for attempt in (1, 2):
            node = self.client.get_node_from_key(self.tag)
            pipe = self.client.get_redis_connection(node).pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            try:
                replies = list(pipe.execute(raise_on_error=False))
            except self._errors:
                if attempt == 2:
                    raise
                self.client.nodes_manager.initialize()
                continue
            if attempt == 2 or not any(isinstance(r, self._moved) for r in replies):
                return replies
            self.client.nodes_manager.initialize()
        raise AssertionError("unreachable")

    def _run(self, calls: Sequence[Call], *, known: bytes | None = None) -> list[Any]:
        """Run scripts in one round trip; a script Redis lost (a restart) is loaded and run again."""
        known = known if known is not None else self._epoch
        commands = [self._evalsha(c, known) for c in calls]
        self._stepped = time.monotonic()
        replies = self._execute(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, self._no_script)]
        if missing:
            scripts = {id(calls[i].script): calls[i].script for i in missing}
            for loaded in self._execute([("SCRIPT", "LOAD", s.script) for s in scripts.values()]):
                if isinstance(loaded, Exception):
                    raise loaded  # a script Redis cannot compile: never retried as if it were missing
            again = self._execute([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    def _evalsha(self, call: Call, known: bytes | None) -> tuple[Any, ...]:
        if call.epoch:
            keys = [*call.keys, self._epoch_key]
            return ("EVALSHA", call.script.sha, len(keys), *keys, *call.args, known or b"", self._proposal)
        return ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)

    def _first_contact(self) -> None:
        """Learn the data-loss marker (once per process) and whether the server keeps its data."""
        with self._epoch_lock:
            if self._epoch is not None:
                return
            commands: list[tuple[Any, ...]] = [self._evalsha(Call(self._epoch_script, [self._epoch_key],
                                                                  [self._proposal]), None),
                                               ("CONFIG", "GET", "appendonly"), ("CONFIG", "GET", "save")]
            replies = self._execute(commands)
            if isinstance(replies[0], self._no_script):
                self._execute([("SCRIPT", "LOAD", self._epoch_script.script)])
                replies[0] = self._execute(commands[:1])[0]
            if isinstance(replies[0], Exception):
                raise replies[0]
            self._adopt(bytes(replies[0]))
        self.persistence = config_of(replies[1], replies[2])
        if self.persistence is not None and not persists(self.persistence) and self._notify is not None:
            self._notify("storage_not_persistent", {"appendonly": self.persistence.get("appendonly"),
                                                    "save": self.persistence.get("save")})

    # --- the data-loss marker --------------------------------------------------------------------

    def _recover(self, marker: bytes) -> None:
        """The app's data is gone (the marker changed): put back this process's share of the period's
        spend, once per change, before any of its steps counts on the new data."""
        with self._epoch_lock:
            if self._epoch == marker or self._closed:
                return  # another thread of this process did it (or the store is closed)
            now = self._now
            with self._ledger_lock:
                spent = self._ledger.live(now)
                untracked = self._ledger.untracked
                self._restoring = True  # a settlement landing meanwhile is not in ``spent``: sent again
            try:
                first = self._restore(marker, spent, now)
            finally:
                with self._ledger_lock:
                    self._restoring = False
        if self._notify is not None:
            usd = [s for s in spent if s.line.key.startswith("usd:")]
            self._notify("storage_data_lost", {
                "restored_budgets": len(spent),
                "restored_usd": round(max([s.amount for s in usd], default=0) / 1_000_000, 6),
                "untracked_settlements": untracked, "noticed_first": first})

    def _restore(self, marker: bytes, spent: list[Spent], now: float) -> bool:
        """(Under ``_epoch_lock``.) Put ``spent`` back on the data ``marker`` names, then adopt it;
        True when this process found the marker gone (it set ``marker``)."""
        for _attempt in range(3):
            lost = None
            for start in range(0, len(spent), RESTORE_BATCH):
                batch = spent[start:start + RESTORE_BATCH]
                restore_id = f"{self._proposal}:{marker.decode()}"  # with each key: once per budget
                reply = self._run([self._restore_call(batch, now, restore_id)], known=marker)[0]
                if isinstance(reply, Exception):
                    raise reply
                if _is(reply, b"lost"):  # lost again meanwhile: start over on the newest data
                    lost = bytes(reply[1])
                    break
            if lost is None:
                break
            marker = lost
        else:  # lost again and again while restoring: adopt nothing, count on nothing
            raise StorageUnavailable("the app's data kept vanishing while this process restored its spend")
        first = marker == self._proposal.encode()  # this process found the marker gone and set it
        self._adopt(marker)
        return first

    def _adopt(self, marker: bytes) -> None:
        """Know ``marker``; propose a new value from now on, so that this process notices a loss
        even when the marker that went was the one it proposed."""
        self._epoch = marker
        self._proposal = os.urandom(8).hex()

    def _remember(self, lines: Sequence[Line], thresholds: Sequence[float], now: float,
                  sent_on: bytes | None) -> bool:
        """A settlement landed: its spend goes into the ledger, and this process (a forked worker
        starts its own) watches for a data loss while the ledger has spend to put back. False when it
        landed on data that is gone now, or that another thread is restoring from its ledger (taken
        without this settlement): the caller sends it again."""
        with self._ledger_lock:
            if sent_on is not None and (sent_on != self._epoch or self._restoring):
                return False
            self._ledger.add(lines, thresholds, now)
        watcher, pid = self._watcher, process.pid()
        if watcher is None or watcher[0] != pid or not watcher[1].is_alive():
            with self._ledger_lock:
                if self._watcher is None or self._watcher[0] != pid or not self._watcher[1].is_alive():
                    thread = threading.Thread(target=_watch, args=(weakref.ref(self),),
                                              name="flask-claude-data-watch", daemon=True)
                    thread.start()
                    self._watcher = (pid, thread)
        return True

    def _watch_once(self) -> bool:
        """One look at the marker; False when there is nothing left to watch for (the ledger has no
        live spend, or the store was closed)."""
        with self._ledger_lock:
            if self._closed or not self._ledger.live(self._now):
                if self._watcher is not None and self._watcher[1] is threading.current_thread():
                    self._watcher = None
                return False
        if time.monotonic() - self._stepped < WATCH_S:
            return True  # a step ran lately: it checked the marker itself, no need to ask
        try:
            reply = self._run([Call(self._epoch_script, [self._epoch_key], [self._proposal])])[0]
            if not isinstance(reply, Exception) and self._epoch is not None and bytes(reply) != self._epoch:
                self._recover(bytes(reply))
        except self._errors:
            pass  # storage away: the outage guard and the next step deal with it
        return True

    def _forked(self) -> None:
        """In a forked child: what the parent owns stays the parent's. Its settlements waiting are
        its own to send (sent by both, they would count twice), its ledger is its spend (restored by
        both, it would count twice), and its proposal names its restores (shared, one child's restore
        would make the others' no-ops)."""
        self._pending_lock = threading.Lock()
        self._landed = threading.Condition(self._pending_lock)
        self._pending, self._in_flight, self._flushing, self._owing = [], 0, 0, False
        self._flush_wakeup = threading.Event()
        self._flusher = self._watcher = None
        self._epoch_lock = threading.Lock()
        self._ledger_lock = threading.Lock()
        self._ledger = Ledger()
        self._restoring = False
        self._proposal = os.urandom(8).hex()

    def close(self) -> None:
        """Stop watching (an app torn down, a test's store): a closed store never restores spend, and
        its flusher stops retrying what storage did not take."""
        with self._ledger_lock:
            self._closed = True

    def _restore_call(self, batch: Sequence[Spent], now: float, restore_id: str) -> Call:
        thresholds = batch[0].thresholds if batch else ()
        args: list[Any] = [restore_id, repr(now), len(thresholds), *(repr(t) for t in thresholds)]
        for entry in batch:
            args += [entry.amount, entry.line.limit, repr(entry.line.expires_at)]
        return Call(self._restore_script, [self._k(e.line.key) for e in batch], args, epoch=True)

    def _run_marked(self, calls: list[Call]) -> tuple[list[Any], list[bytes | None]]:
        """``_run``, and when the data was lost: recover, then run the refused calls again. Also
        returns the marker each call was sent with: one that landed on data lost since must land again."""
        if self._epoch is None and any(c.epoch for c in calls):
            self._first_contact()
        known = self._epoch
        replies = self._run(calls, known=known)
        used: list[bytes | None] = [known if c.epoch else None for c in calls]
        for _attempt in range(3):
            lost = [i for i, r in enumerate(replies) if _is(r, b"lost")]
            if not lost:
                break
            self._recover(bytes(replies[lost[0]][1]))
            known = self._epoch
            again = self._run([calls[i] for i in lost], known=known)
            for i, reply in zip(lost, again, strict=True):
                replies[i], used[i] = reply, known
        if any(_is(r, b"lost") for r in replies):
            raise StorageUnavailable("the app's data kept vanishing")
        return replies, used

    # --- settlements written behind ---------------------------------------------------------------

    def _run_with_pending(self, call: Call | None, *, all_rollups: bool = False, probe: bool = False) -> Any:
        """``call`` (if any) in the same round trip as every settlement waiting to be written, and the
        rollups waiting if they are due (any that wait, with ``all_rollups``); ``probe``: a PING when
        nothing else is sent."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            rollup = self.rollups.take(force=all_rollups)
            sending = bool(pending) or rollup is not None
            if sending:
                self._in_flight += 1
        try:
            return self._send(pending, call, Call(*rollup) if rollup is not None else None, probe=probe)
        finally:
            if sending:
                with self._pending_lock:
                    self._in_flight -= 1
                    if not self._in_flight and self._flushing:
                        self._landed.notify_all()

    def _send(self, pending: list[_Pending], call: Call | None, rollup: Call | None = None, *,
              probe: bool = False) -> Any:
        # A failed rollup write (an error reply, or no reply) is dropped with its interval's counts:
        # only monitoring numbers, and a retry could count twice what a hung Redis still applies.
        calls: list[Call] = [p.call for p in pending]
        if rollup is not None:
            calls.append(rollup)
        if call is not None:
            calls.append(call)
        if not calls:
            if probe:
                self._call(self._execute, [("PING",)])
            return None
        try:
            replies, used = self._run_marked(calls)
        except self._errors as exc:
            self._owe(pending)  # kept: each is applied at most once when it is sent again
            raise StorageUnavailable(type(exc).__name__) from exc
        except BaseException:
            self._owe(pending)  # not a storage error (a bug): still never silently dropped
            raise
        replayed, self._owing = self._owing, False
        now = self._now
        landed: list[_Pending] = []
        for p, reply, sent_on in zip(pending, replies, used, strict=False):
            if p.record:
                continue  # a pacing record: best effort, nobody waits for it
            if isinstance(reply, Exception) or _is(reply, b"lost"):
                self._owe([p])  # an error reply: the script did not run
                continue
            if not self._remember(p.lines, p.thresholds, now, sent_on):
                self._owe([p])  # it landed on data lost since (another thread restores): land it again
                continue
            landed.append(p)
            p.done([] if _is(reply, b"dup") else self._crossed(p.lines, reply), None)
        if replayed and landed and self._notify is not None:
            self._notify("spend_replayed", _replayed(landed))
        if call is None:
            return None
        reply = replies[-1]
        if isinstance(reply, Exception):
            raise StorageUnavailable(type(reply).__name__) from reply
        return reply

    def _owe(self, pending: Sequence[_Pending]) -> None:
        """A round trip failed: keep the settlements it carried for the next one that works (and send
        nothing on our own meanwhile); past ``MAX_OWED`` the oldest go back to their caller as not sent
        (budget.py keeps their spend)."""
        kept = [p for p in pending if not p.record]
        self._owing = True
        if not kept:
            return
        with self._pending_lock:
            self._pending[:0] = kept
            over = self._pending[:max(0, len(self._pending) - MAX_OWED)]
            del self._pending[:len(over)]
        for p in over:
            p.done(None, "not_sent")

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
            pass  # the settlements are kept (``_owe``); a rollup write is dropped

    def _flush_soon(self) -> None:
        """A flusher thread per process (a forked worker starts its own) for quiet moments; it ends
        after a quiet spell and the next settlement starts it again. Not while a send failed: what
        waits then rides on the next round trip that works (a request's, or the outage probe)."""
        pid = process.pid()
        flusher = self._flusher
        if self._owing:  # the flusher retries on its own, backing off: only make sure it runs
            if flusher is None or flusher[0] != pid or not flusher[1].is_alive():
                with self._pending_lock:
                    self._start_flusher(pid)
            return
        if flusher is not None and flusher[0] == pid and self._flush_wakeup.is_set():
            return  # this process's flusher has a wake-up waiting already (it clears _flusher when it ends)
        with self._pending_lock:
            self._start_flusher(pid)
            self._flush_wakeup.set()

    def _start_flusher(self, pid: int) -> None:
        """(Under ``_pending_lock``.) A flusher for this process, unless one runs."""
        if self._flusher is None or self._flusher[0] != pid or not self._flusher[1].is_alive():
            thread = threading.Thread(target=self._flush_loop, name="flask-claude-settle", daemon=True)
            thread.start()  # first: a thread that could not start is never taken for a live flusher
            self._flusher = (pid, thread)

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
            backoff = self._settle_delay
            while self._owing and self._pending and not self._closed:
                # Storage is away and settlements wait: a request's round trip or the outage probe may
                # carry them, but an idle worker has neither, so try again here, backing off.
                backoff = min(OWED_RETRY_MAX_S, backoff * 2)
                time.sleep(backoff * (0.5 + random.random()))
                self._send_waiting()

    def _queue(self, pending: _Pending) -> None:
        with self._pending_lock:
            self._pending.append(pending)
            full = len(self._pending) >= MAX_PENDING and not self._owing
        if full:
            self._send_waiting()
        else:
            self._flush_soon()

    # --- the steps ----------------------------------------------------------------------------------

    def _frame(self, shape: tuple[Any, ...], build: Callable[[], Frame]) -> Frame:
        frame = self._frames.get(shape)
        if frame is None:
            if len(self._frames) >= MAX_FRAMES:
                self._frames.clear()
            frame = self._frames[shape] = build()
        return frame

    def begin(self, step: Begin, now: float) -> Outcome:
        gates, requests, holds = step.gates, step.requests, step.holds
        self._now = max(self._now, now)
        if step.downgrade_line >= 0 and len(step.alt_amounts) != len(holds):
            raise ValueError(f"{len(step.alt_amounts)} step-down amounts for {len(holds)} holds")
        # The frame (keys and the plan's fixed arguments) is cached by value, never by an object's id.
        shape = (len(gates), len(requests), tuple(step.breakers), step.optional_holds, step.downgrade_line,
                 step.downgrade_at, step.exhausted_alert, *[(li.key, li.limit, li.expires_at) for li in gates],
                 *[(li.key, li.limit, li.window) for li in requests],
                 *[(li.key, li.limit, li.expires_at) for li in holds])
        frame = self._frame(shape, lambda: self._begin_frame(step))
        amounts = [line.amount for line in holds]
        own: list[Any] = [repr(now), step.member, step.rid, repr(step.hold_until), *amounts,
                          *(step.alt_amounts if step.downgrade_line >= 0 else amounts),
                          *[repr(now - line.window) for line in requests]]
        res = self._run_with_pending(frame.call(own))
        ok = bool(int(res[0]))
        stage = res[1].decode() if isinstance(res[1], bytes) else str(res[1])
        if not ok:
            return Outcome(ok=False, stage=stage, failed=int(res[2]), busy=bool(int(res[6])),
                           retry_after=float(res[3]), newly_exhausted=bool(int(res[4])), spent=int(res[5]))
        nr = len(requests)
        breakers = {m: (float(v) if v else None) for m, v in zip(step.breakers, res[10 + 2 * nr:], strict=True)}
        return Outcome(ok=True, remaining=tuple(res[10:10 + nr]),
                       resets=tuple([float(x) for x in res[10 + nr:10 + 2 * nr]]), breakers=breakers,
                       held=res[7] == 1, downgraded=res[8] == 1, fraction=float(res[9]))

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
        return Frame(self._begin, keys, args)

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None,
               rollup: dict[str, int] | None = None, seen_closed: bool = False) -> list[Crossed]:
        """At once; the ``rollup`` is still summed and written with the others (``settle_later``)."""
        self._now = max(self._now, now)
        if rollup:
            self.rollups.add(rollup, now)
            self._flush_soon()
        call = self._settle_call(lines, rids, thresholds, now, success, breaker, seen_closed)
        for _attempt in range(3):
            replies, used = self._call(self._run_marked, [call])
            reply = replies[0]
            if isinstance(reply, Exception):
                raise StorageUnavailable(type(reply).__name__)
            if self._remember(lines, thresholds, now, used[0]):
                break
        else:
            raise StorageUnavailable("the app's data kept vanishing")
        return [] if _is(reply, b"dup") else self._crossed(lines, reply)

    def settle_later(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     done: SettleDone, success: str | None = None, breaker: BreakerParams | None = None,
                     rollup: dict[str, int] | None = None, seen_closed: bool = False) -> None:
        """``settle``, written behind: ``done(crossed, failure)`` is called once it landed. The
        ``rollup`` is summed into the worker's rollups (written once due); a step that is only a
        rollup (no budget line, no success to record) sends nothing of its own and is done at once."""
        self._now = max(self._now, now)
        if rollup:
            self.rollups.add(rollup, now)
        if not lines and (success is None or breaker is None):
            done([], None)
            if rollup:
                self._flush_soon()
            return
        call = self._settle_call(lines, rids, thresholds, now, success, breaker, seen_closed)
        self._queue(_Pending(call, lines, done, thresholds))

    def later(self, script: Any, keys: list[str], args: list[Any]) -> None:
        """A pacing record (``storage/pacing.py``), written behind like a settlement and with it."""
        self._queue(_Pending(Call(script, keys, args), (), _no_done, record=True))

    def _admit_now(self, call: tuple[Any, list[str], list[Any]]) -> Any:
        """A pacing admission: synchronous, after this process's records waiting to be written."""
        return self._run_with_pending(Call(*call))

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
        frame = self._frame(shape, lambda: self._settle_frame(lines, thresholds, success, breaker))
        return frame.call([repr(now), " ".join(rids), "1" if seen_closed else "0", *[li.amount for li in lines]])

    def _settle_frame(self, lines: Sequence[Line], thresholds: Sequence[float], success: str | None,
                      breaker: BreakerParams | None) -> Frame:
        keys = [self._k(line.key) for line in lines]
        args: list[Any] = [len(thresholds), *(repr(t) for t in thresholds), len(lines)]
        for line in lines:
            args += [line.limit, repr(line.expires_at)]
        if success is not None and breaker is not None:
            keys.append(self._b(success))
            args += [breaker.min_calls, repr(breaker.failure_rate), repr(breaker.window), repr(breaker.cooldown)]
        return Frame(self._settle, keys, args)

    def check(self) -> dict[str, Any]:
        """What ``flask claude check`` reports: whether Redis answers, whether it keeps its data, and
        the data-loss marker this process found there."""
        self._call(self._run_with_pending, None, probe=True)
        if self._epoch is None:
            self._call(self._first_contact)
        config = self.persistence
        try:  # an eviction policy that may drop any key drops budgets (and the marker) under memory pressure
            policy = config_of(self._call(self._execute, [("CONFIG", "GET", "maxmemory-policy")])[0])
        except StorageUnavailable:
            policy = None
        return {"reachable": True, "persistence": config,
                "persists": None if config is None else persists(config),
                "eviction": None if policy is None else policy.get("maxmemory-policy"),
                "marker": None if self._epoch is None else self._epoch.decode()}

    def ping(self) -> None:
        """The outage guard's probe, on the path requests take: what waits to be written rides on it."""
        self._run_with_pending(None, probe=True)

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        if not keys:
            return []
        reply = self._call(self._run, [Call(self._usage, [self._k(k) for k in keys], [repr(now)])])[0]
        if isinstance(reply, Exception):
            raise StorageUnavailable(type(reply).__name__)
        return [(int(spent), int(held)) for spent, held in reply]

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


def _replayed(landed: Sequence[_Pending]) -> dict[str, Any]:
    """The ``spend_replayed`` fields: settlements kept while storage was away, now landed."""
    per_key: dict[str, int] = {}
    for p in landed:
        for line in p.lines:
            per_key[line.key] = per_key.get(line.key, 0) + line.amount
    # every call adds its cost to each of its USD budgets: the largest is the outage's spend when
    # an app-wide budget is set (all calls touch it)
    usd = max([amount for key, amount in per_key.items() if key.startswith("usd:")], default=0)
    return {"settlements": len(landed), "budgets": len(per_key), "usd": round(usd / 1_000_000, 6), "lost_usd": 0.0}


def _watch(ref: weakref.ReferenceType[RedisStore]) -> None:
    """Why: a worker notices a data loss at its next step, and one that gets no request would never
    put its share back while the others spend against a budget missing it. So while a store has
    spend to put back, its process reads the marker every ``WATCH_S`` seconds (one round trip),
    idle or not. The thread holds the store weakly: a store nobody uses any more is not kept alive."""
    while True:
        time.sleep(WATCH_S)
        store = ref()
        if store is None or not store._watch_once():
            return
        del store


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def close_all() -> None:
    """Close every store of this process (``RedisStore.close``): for tests that empty Redis between
    cases, where the earlier cases' stores must not take that for a data loss."""
    for store in list(_STORES):
        store.close()


def _no_done(crossed: Any, failure: str | None) -> None:
    return None


_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


@atexit.register
def flush_all() -> None:
    """A worker stopping cleanly (gunicorn's graceful exit, ``sys.exit``) writes what is waiting:
    settlements, and the rollup increments summed since their last write."""
    for store in list(_STORES):
        store.flush()
