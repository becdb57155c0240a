"""What flask-claude's OpenTelemetry hooks cost per guarded call: ``start_call``, one attempt made
current, ``finish`` with usage (span attributes and the two metrics).

  no provider    the app configured no OpenTelemetry (the API comes with anthropic): spans are
                 invalid, no context switch, the metric proxies do nothing
  SDK providers  the OpenTelemetry SDK's TracerProvider (SimpleSpanProcessor into the in-memory
                 exporter, cleared every round) and MeterProvider (in-memory reader)

The anthropic SDK's own span per attempt is not included (it is the SDK's cost, with or without us).

Run: .venv/bin/python bench/otel_hooks.py   (BENCH_ROUNDS, default 21; BENCH_N calls per round, 1000)
"""

from __future__ import annotations

import os
import statistics
import time

from flask_claude import telemetry
from flask_claude.pricing import Cost

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "21"))
N = int(os.environ.get("BENCH_N", "1000"))
COST = Cost(usd=0.001, input_tokens=20, output_tokens=30, cache_read_input_tokens=0, cache_creation_input_tokens=0)


def one_call() -> None:
    span = telemetry.start_call(operation="chat", chain=["claude-sonnet-4-6", "claude-haiku-4-5"], max_tokens=100,
                                feature="ask", route="/ask", user="alice", salt="s")
    with span.current():
        pass  # the SDK call would run here
    span.finish(model="claude-sonnet-4-6", retries=0, cost=COST, stop_reason="end_turn")


def measure(label: str, between_rounds: object = None) -> None:
    for _ in range(2000):
        one_call()
    rounds = []
    for _ in range(ROUNDS):
        if callable(between_rounds):
            between_rounds()
        t0 = time.perf_counter()
        for _ in range(N):
            one_call()
        rounds.append((time.perf_counter() - t0) / N * 1e6)
    print(f"  {label:16s} {min(rounds):7.2f} / {statistics.median(rounds):7.2f} us per call (fastest / median round)")


def main() -> None:
    print(f"{ROUNDS} rounds x {N} calls")
    measure("no provider")
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    measure("SDK providers", exporter.clear)


if __name__ == "__main__":
    main()
