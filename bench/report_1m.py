"""How long ``build_report`` takes over a 1,000,000-line log, and how much memory it needs.

Not a timed test (machines differ); run it by hand after changing ``report.py``:

    python bench/report_1m.py [--lines 1000000] [--by feature] [--keep]

The log is written line by line to a temp dir (never held in memory), so the peak RSS printed
after the report is the report's own peak plus the interpreter; the baseline is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from flask_claude.report import build_report, render_text

FEATURES = ["summarize", "translate", "chat", "search", "classify", None]
MODELS = ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"]


def peak_rss_mb() -> float:
    """ru_maxrss is in KiB on Linux (bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def write_log(path: str, lines: int, users: int) -> float:
    """A realistic mix: ~96% calls, ~3% errors, fallbacks, degradations, a few malformed lines."""
    rng = random.Random(42)
    start = datetime.now(UTC) - timedelta(days=2)
    step = timedelta(days=2) / lines
    total = 0.0
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(lines):
            ts = (start + step * i).isoformat(timespec="milliseconds")
            roll = rng.random()
            record: dict[str, Any]
            feature = rng.choice(FEATURES)
            if roll < 0.0001:
                fh.write('{"ts": "' + ts + '", "event": "claude_api_call", "cost_u\n')  # truncated write
                continue
            if roll < 0.01:
                record = {"ts": ts, "event": rng.choice(["feature_degraded", "limit_exceeded"]),
                          "feature": feature, "route": f"/{feature}", "user": f"user-{rng.randrange(users)}",
                          "reason": rng.choice(["upstream_unavailable", "rate_limited", "budget_exhausted"]),
                          "status": 503}
            elif roll < 0.015:
                record = {"ts": ts, "event": "model_fallback", "feature": feature, "route": f"/{feature}",
                          "from_model": MODELS[0], "to_model": MODELS[1], "reason": "overloaded_error",
                          "status_code": 529}
            else:
                error = roll < 0.045
                model = rng.choice(MODELS)
                cost = 0.0 if error else round(rng.uniform(0.0001, 0.05), 8)
                total += cost
                record = {"ts": ts, "event": "claude_api_error" if error else "claude_api_call",
                          "request_id": f"req_{i:016x}", "feature": feature,
                          "route": f"/{feature}" if feature else None, "user": f"user-{rng.randrange(users)}",
                          "model": model, "requested_model": model, "fallback_from": None,
                          "latency_ms": round(rng.lognormvariate(6.5, 0.6), 1), "retries": 0,
                          "system_prompt_hash": "3f2a9c0d1e4b5a6f",
                          "input_tokens": rng.randrange(50, 4000), "output_tokens": rng.randrange(10, 800),
                          "cache_read_input_tokens": rng.choice([0, 0, 2048]),
                          "cache_creation_input_tokens": rng.choice([0, 0, 0, 1024]),
                          "stop_reason": None if error else "end_turn", "cost_usd": cost}
                if error:
                    record.update(error_type="overloaded_error", status_code=529)
            fh.write(json.dumps(record) + "\n")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--by", default="feature", choices=["feature", "model", "user", "route"])
    parser.add_argument("--keep", action="store_true", help="keep the generated log and print its path")
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="flask-claude-bench-")
    path = os.path.join(directory, "claude.jsonl")
    started = time.perf_counter()
    expected = write_log(path, args.lines, args.users)
    print(f"wrote {args.lines:,} lines ({os.path.getsize(path) / 1e6:,.0f} MB) in "
          f"{time.perf_counter() - started:.1f}s")
    baseline = peak_rss_mb()

    started = time.perf_counter()
    with open(path, "rb") as lines:
        report = build_report(lines, since=None, by=args.by, source=path)
    elapsed = time.perf_counter() - started
    print(render_text(report))
    print(f"build_report: {elapsed:.2f}s ({args.lines / elapsed:,.0f} lines/s), --by {args.by}")
    print(f"peak RSS: {peak_rss_mb():.0f} MB (baseline before the report {baseline:.0f} MB)")
    print(f"spend check: report ${report.total.spend_usd:.6f} vs generated ${expected:.6f}")
    if args.keep:
        print(f"log kept at {path}")
    else:
        os.remove(path)
        os.rmdir(directory)


if __name__ == "__main__":
    main()
