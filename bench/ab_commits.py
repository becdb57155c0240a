"""Two or more commits of flask-claude side by side in one process, against a bare route and Flask-Limiter.

``overhead.py`` measures one checkout; its run-to-run drift (±10-20 us on the paired "added" figure)
hides a change worth 10 us. Here each commit's ``flask_claude/`` is taken with ``git archive`` into a
temporary directory and imported under its own name (``flask_claude_<n>_<sha>``), so the commits' apps
run interleaved in the same rounds, on the same Redis, with the same warm caches: the difference
between two commits is then steady to a few microseconds (the same commit listed twice shows how
far apart equal code lands). This is how the flusher thread's per-request wake-up (~40 us on Redis:
a thread woken for every settlement contends for the GIL with the request) was found. Caveat: one
version's background threads (an old commit's flusher) run during the others' rounds too.

Each app is ``overhead.py``'s guarded route (flags, three limits, three budgets, a log line to a
file, the feature bounding its input), before-view admission.

Run: .venv/bin/python bench/ab_commits.py HEAD~1 HEAD [HEAD ...] [--stores memory,redis]
     (AB_ROUNDS=60 by default: ~30 s per store per commit on 2 cores)
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from _common import RedisServer, machine_description, paired, round_medians, wait_for_quiet
from flask import Flask, request
from loguru import logger
from overhead import MODEL, Caller, app_a, app_d

from flask_claude.simulator import Simulator

ROUNDS = int(os.environ.get("AB_ROUNDS", "60"))
BATCH = int(os.environ.get("AB_BATCH", "60"))
WARMUP = int(os.environ.get("AB_WARMUP", "300"))
ROOT = Path(__file__).resolve().parent.parent


def snapshot(commit: str, into: Path, index: int) -> tuple[str, str]:
    """``flask_claude/`` of ``commit``, importable as ``flask_claude_<index>_<sha>`` from ``into`` (the
    index lets one commit be listed twice: an A/A run shows the noise)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    name = f"flask_claude_{index}_{sha}"
    data = subprocess.run(["git", "archive", sha, "flask_claude"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into / name, filter="data")
    (into / name / "flask_claude").rename(into / f"{name}.tmp")
    (into / name).rmdir()
    (into / f"{name}.tmp").rename(into / name)
    for path in (into / name).rglob("*.py"):  # absolute imports of itself, if a module has any
        path.write_text(re.sub(r"\bflask_claude\b", name, path.read_text()))
    subject = subprocess.run(["git", "log", "-1", "--format=%s", sha], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.strip()
    return name, f"{sha} {subject[:70]}"


def guarded(package: str, uri: str, log_path: str, name: str) -> Flask:
    fc: Any = importlib.import_module(package)
    app = Flask(name)
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=[MODEL, "claude-haiku-4-5"], CLAUDE_STORAGE_URI=uri,
                      CLAUDE_DAILY_BUDGET_USD=1_000_000, CLAUDE_LOG_PATH=log_path, CLAUDE_ADMISSION="before_view",
                      CLAUDE_STORAGE_PREFIX=name)
    claude = fc.Claude()
    claude.init_app(app)

    @app.post("/ask")
    @fc.ai_feature("ask", max_tokens=64, max_input_chars=4000)
    @fc.budgeted(requests="1000000/minute", tokens="1000000000/day", usd="1000000/day")
    @fc.fallback_to({"text": None, "notice": "paused"}, status=503)
    def ask() -> Any:
        msg = claude.messages.create(model=MODEL, max_tokens=64,
                                     messages=[{"role": "user", "content": request.json["text"]}])
        return {"text": msg.content[0].text}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("commits", nargs="+")
    parser.add_argument("--stores", default="memory,redis")
    options = parser.parse_args()
    stores = options.stores.split(",")
    logger.remove()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    sys.path.insert(0, str(tmp))
    versions = [snapshot(commit, tmp, i) for i, commit in enumerate(options.commits, 1)]
    redis_server = RedisServer()
    try:
        sim = Simulator()
        callers: dict[str, Caller] = {"bare": Caller(app_a(sim))}
        for store in stores:
            uri = "memory://" if store == "memory" else redis_server.url
            callers[f"Flask-Limiter {store}"] = Caller(app_d(sim, uri, f"ab_fl_{store}"))
            for i, (package, _) in enumerate(versions):
                label = f"#{i + 1} {store}"
                callers[label] = Caller(guarded(package, uri, str(tmp / f"{i}-{store}.jsonl"), f"ab_{i}_{store}"))
        keys = list(callers)
        wait_for_quiet()
        for _ in range(WARMUP):
            for key in keys:
                callers[key]()
        started = time.monotonic()
        medians = round_medians(dict(callers), ROUNDS, BATCH)
        print(f"== added time per request over the bare route, paired medians of {ROUNDS} interleaved rounds x "
              f"{BATCH} requests ({time.monotonic() - started:.0f} s) ==")
        for i, (_, description) in enumerate(versions):
            print(f"  #{i + 1}: {description}")
        added = {key: paired(medians, key, "bare") for key in keys if key != "bare"}
        for key, value in added.items():
            print(f"{key:26s} +{value:6.1f} us")
        for store in stores:
            base = added[f"Flask-Limiter {store}"]
            ratios = ", ".join(f"#{i + 1} {added[f'#{i + 1} {store}'] / base:.2f}" for i in range(len(versions)))
            print(f"ratio to Flask-Limiter on {store}: {ratios}")
        print(machine_description(redis_server.version()))
    finally:
        redis_server.stop()


if __name__ == "__main__":
    main()
