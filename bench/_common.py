"""Shared pieces of the benchmarks: a private redis-server, gunicorn on loopback, machine facts, stats.

Nothing here contacts anything but 127.0.0.1. Every process started here is stopped by the script
that started it (``stop()`` in a ``finally``), each wait is bounded.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


# The checkout's HEAD when the benchmark started: another session may commit while it runs.
HEAD_AT_START = _git("log", "-1", "--format=%h %s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process of our own (no persistence), stopped by ``stop``: on a free loopback port,
    or with ``unix=True`` on a unix socket only (``--port 0 --unixsocket <tmp>/redis.sock
    --unixsocketperm 700``, in a directory of its own that ``stop`` removes). ``url`` is the URI both
    flask-claude and Flask-Limiter take (``redis+unix://`` for a socket: limits, which builds
    Flask-Limiter's client, does not know a bare ``unix://``); ``unix_url`` is redis-py's spelling
    (``unix://``), which flask-claude takes since 7e465d7."""

    def __init__(self, *, unix: bool = False) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.socket_dir: str | None = None
        if unix:
            self.socket_dir = tempfile.mkdtemp(prefix="bench-redis-")
            self.socket = os.path.join(self.socket_dir, "redis.sock")
            self.port = 0
            self.url = f"redis+unix://{self.socket}?db=0"
            self.unix_url = f"unix://{self.socket}?db=0"
            listen = ["--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700"]
            self.client = redis.Redis(unix_socket_path=self.socket, socket_timeout=1.0)
        else:
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.client = redis.Redis(port=self.port, socket_timeout=1.0)
        self.process = subprocess.Popen(
            [binary, *listen, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client.ping():
                    break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])

    def commandstats(self) -> dict[str, int]:
        """``INFO commandstats`` as {command: calls}; the INFO call itself is left out."""
        stats = self.client.info("commandstats")
        out = {}
        for name, fields in stats.items():
            command = name.removeprefix("cmdstat_")
            if command == "info":
                continue
            out[command] = int(fields["calls"])
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def evalsha_usec(client: Any) -> int:
    """Microseconds Redis has spent in EVALSHA so far (``INFO commandstats``): a script's figure
    includes the commands it runs, so for clients that send nothing but scripts (both variants of
    ``overhead.py``) it is the server's whole time for them."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def diff_stats(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if after.get(k, 0) - before.get(k, 0)}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def round_medians(callers: dict[str, Callable[[], Any]], rounds: int, batch: int, *, collect: bool = False,
                  after_batch: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Each caller's median time (us) per round: ``batch`` calls in a row, the callers in an order
    rotated every round, so drift (CPU frequency, the other core's load) lands on all of them alike.
    ``collect``: a ``gc.collect()`` before each batch; ``after_batch``: run after each (untimed)."""
    keys = list(callers)
    medians: dict[str, list[float]] = {k: [] for k in keys}
    perf = time.perf_counter_ns
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            if collect:
                gc.collect()
            call, samples = callers[key], []
            for _ in range(batch):
                t0 = perf()
                call()
                samples.append((perf() - t0) / 1000)
            medians[key].append(percentile(samples, 50))
            if after_batch is not None:
                after_batch()
    return medians


def paired(medians: dict[str, list[float]], key: str, base: str) -> float:
    """The median over rounds of ``key``'s round median minus ``base``'s: the steadiest "added" figure."""
    return percentile([m - b for m, b in zip(medians[key], medians[base], strict=True)], 50)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description(redis_version: str | None = None) -> str:
    packages = ["flask-claude", "anthropic", "httpx2", "Flask", "Werkzeug", "Flask-Limiter", "limits",
                "redis", "loguru", "gunicorn"]
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    if redis_version is None:
        binary = shutil.which("redis-server")
        redis_version = (subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[2]
                         .removeprefix("v=") if binary else "not installed")
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return "\n".join([
        f"code:    {code_description()}",
        f"machine: {cores} cores (nproc), {_cpu_model()}, {platform.system()} {platform.release()}",
        f"python:  {sys.version.split()[0]} ({platform.python_implementation()})",
        f"redis:   {redis_version} (own redis-server, loopback TCP or a unix socket, no persistence)",
        f"packages: {', '.join(versions)}",
    ])


def code_description() -> str:
    """Which flask_claude this process imported: the checkout, or a ``git archive`` snapshot of one commit.

    A snapshot (``PYTHONPATH=/tmp/fc-snap/<sha>``, see RESULTS.md) keeps the measured code fixed while
    the checkout moves; its ``.commit`` file (``git log -1 --format='%h %s'``) names the commit.
    """
    import flask_claude

    origin = Path(flask_claude.__file__).resolve().parent.parent
    if origin != ROOT:
        marker = origin / ".commit"
        label = marker.read_text().strip() if marker.exists() else "unknown commit"
        return f"flask-claude at {label[:90]} (git archive snapshot in {origin}; the checkout's HEAD: " \
               f"{_git('log', '-1', '--format=%h')})"
    commit = _git("log", "-1", "--format=%h %s")
    dirty = _git("status", "--short", "--", "flask_claude").split()[1::2]
    text = f"flask-claude at {commit[:90]}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
    if commit != HEAD_AT_START:
        text += f" (WARNING: HEAD was {HEAD_AT_START[:60]} when the run started)"
    return text


class Gunicorn:
    """gunicorn on a free loopback port, serving ``app`` (a ``module:callable()``) from ``bench/``."""

    def __init__(self, app: str, env: dict[str, str], *, workers: int = 4, threads: int = 16) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr_path = Path(env.get("BENCH_TMP", "/tmp")) / f"gunicorn-{self.port}.err"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "gthread",
             "--threads", str(threads), "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning",
             "--chdir", str(BENCH), app],
            cwd=BENCH, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=self._stderr)
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"gunicorn did not start: {self.stderr_path.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        terminate(self.process)
        self._stderr.close()


def terminate(process: subprocess.Popen[Any] | None, timeout: float = 15) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL if it has not ended within ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- other load on the machine ------------------------------------------------------------------

def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def _process_ticks(pids: Sequence[int]) -> int:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks


class LoadMeter:
    """How busy the machine was during a run, and how much of that was not us (``pids``: ours)."""

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = [os.getpid(), *pids]
        self.busy0, self.total0 = _machine_ticks()
        self.ours0 = _process_ticks(self.pids)

    def report(self) -> str:
        busy, total = _machine_ticks()
        ours = _process_ticks(self.pids)
        d_total = max(1, total - self.total0)
        machine = (busy - self.busy0) / d_total * 100
        mine = (ours - self.ours0) / d_total * 100
        return (f"CPU during the run: machine {machine:.0f}% busy (all cores), this benchmark's processes "
                f"{mine:.0f}%, other processes ~{max(0.0, machine - mine):.0f}%")


def wait_for_quiet(max_wait: float | None = None, threshold: float = 20.0) -> str:
    """Wait (bounded: BENCH_QUIET_WAIT s, default 60) until the machine is mostly idle for one second."""
    if max_wait is None:
        max_wait = float(os.environ.get("BENCH_QUIET_WAIT", "60"))
    started = time.monotonic()
    while True:
        busy0, total0 = _machine_ticks()
        time.sleep(1.0)
        busy1, total1 = _machine_ticks()
        busy = (busy1 - busy0) / max(1, total1 - total0) * 100
        waited = time.monotonic() - started
        if busy < threshold or waited >= max_wait:
            return (f"machine {busy:.0f}% busy before the run (waited {waited:.0f} s for it to be under "
                    f"{threshold:.0f}%)")
