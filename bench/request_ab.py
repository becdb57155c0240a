"""A/B of one decorated request, flask-claude at two commits in ONE process, in alternating rounds.

On a shared machine, separate runs of overhead.py drift by more than a small change costs; here both
versions run side by side (each commit's ``flask_claude/`` imported under its own package name: the
package only imports itself relatively), so other load lands on both alike. The request is
overhead.py's (b): ``@ai_feature`` + ``@budgeted(requests, tokens, usd)`` + ``@fallback_to``, a
guarded ``messages.create`` answered by the in-process simulator, memory storage, a daily budget, the
log written to a file; loguru's default handler removed; no OpenTelemetry provider configured.

  .venv/bin/python bench/request_ab.py 53fb9ac HEAD      (BENCH_ROUNDS, default 25; BENCH_N, 200)
"""

from __future__ import annotations

import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flask import Flask, request
from loguru import logger
from werkzeug.test import EnvironBuilder

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "25"))
N = int(os.environ.get("BENCH_N", "200"))
MODEL = "claude-sonnet-4-6"


def import_commit(commit: str, into: Path, index: int) -> Any:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], capture_output=True, text=True,
                         check=True).stdout.strip()
    name = f"fc{index}_{sha}"  # the index allows an A/A run (the same commit twice) to gauge the noise
    target = into / name
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "flask_claude"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target), "--strip-components=1"], input=archive.stdout, check=True)
    return importlib.import_module(name), sha


def make_app(fc: Any, log_path: str) -> Flask:
    app = Flask(fc.__name__)
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=[MODEL, "claude-haiku-4-5"], CLAUDE_STORAGE_URI="memory://",
                      CLAUDE_DAILY_BUDGET_USD=1_000_000, CLAUDE_LOG_PATH=log_path)
    claude = fc.Claude(app)

    @app.post("/ask")
    @fc.ai_feature("ask", max_tokens=64)
    @fc.budgeted(requests="1000000/minute", tokens="1000000000/day", usd="1000000/day")
    @fc.fallback_to({"text": None, "notice": "paused"}, status=503)
    def ask() -> Any:
        msg = claude.messages.create(model=MODEL, max_tokens=64,
                                     messages=[{"role": "user", "content": request.json["text"]}])
        return {"text": msg.content[0].text}

    return app


def caller(app: Flask) -> Any:
    body = json.dumps({"text": "Summarize: the quarterly report shows steady growth."}).encode()
    builder = EnvironBuilder(path="/ask", method="POST", data=body, content_type="application/json",
                             environ_base={"REMOTE_ADDR": "127.0.0.1"})
    environ = builder.get_environ()
    builder.close()

    def call() -> None:
        env = dict(environ)
        env["wsgi.input"] = io.BytesIO(body)
        status: list[str] = []
        for _ in app.wsgi_app(env, lambda s, h, e=None: status.append(s)):
            pass
        assert status[0].startswith("200"), status

    return call


def main() -> None:
    commits = sys.argv[1:3] or ["HEAD~1", "HEAD"]
    logger.remove()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    sys.path.insert(0, str(tmp))
    calls = {}
    for index, commit in enumerate(commits):
        fc, sha = import_commit(commit, tmp, index)
        calls[f"{index}: {commit} ({sha})"] = caller(make_app(fc, str(tmp / f"{index}-{sha}.jsonl")))
    for call in calls.values():
        for _ in range(300):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(N):
                call()
            times[name].append((time.perf_counter() - t0) / N * 1e6)
    print(f"{ROUNDS} rounds x {N} requests each, alternating; us per request: fastest round / median round")
    first = None
    for name, t in times.items():
        best, median = min(t), statistics.median(t)
        delta = "" if first is None else f"   ({best - first[0]:+.1f} / {median - first[1]:+.1f})"
        first = first or (best, median)
        print(f"  {name:24s} {best:8.1f} / {median:8.1f}{delta}")
    diffs = [b - a for a, b in zip(*times.values(), strict=True)] if len(times) == 2 else []
    if diffs:
        print(f"  paired per-round difference: median {statistics.median(diffs):+.1f} us")


if __name__ == "__main__":
    main()
