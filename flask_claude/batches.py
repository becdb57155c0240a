"""``claude.messages.batches``: the Batch API at half price, inside the same budgets and logs.

A batch can run for a day, in another process than the one that reads its results, so its
reservation is kept as a record in the shared store (keyed by batch id) rather than in memory:
``create`` holds the whole batch's worst case at the batch rate, ``results`` costs every request at
the batch rate, logs one ``claude_api_call`` line per request (with ``custom_id`` and ``batch_id``)
and settles the hold once, however often the results are read.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .budget import Reservation
from .calls import Call
from .context import clamp_max_tokens, current_scope, max_tokens_cap
from .errors import ConfigError
from .rollups import call_fields
from .storage import MICRO, Line, StorageUnavailable
from .tokens import upper_bound_tokens

if TYPE_CHECKING:
    from .runner import CallRunner

BATCH_HOLD_SECONDS = 29 * 3600  # batches end within 24 h; the hold outlives them by a margin
RECORD_TTL_SECONDS = 30 * 86400


def is_batch_request(item: Any) -> bool:
    """The shape the Batch API takes for each request: ``{"custom_id": ..., "params": {...}}``."""
    return isinstance(item, dict) and "custom_id" in item and isinstance(item.get("params"), dict)


class GuardedBatches:
    def __init__(self, runner: CallRunner) -> None:
        self._runner = runner  # the same call steps as claude.messages: retries, deadline, error lines
        self._state = runner.state

    def create(self, *, requests: list[dict[str, Any]], **kwargs: Any) -> Any:
        """``client.messages.batches.create(requests=[{"custom_id", "params"}, ...])``, budgeted."""
        state = self._state
        settings = state.settings
        scope = current_scope()
        if not requests:
            raise ConfigError("a batch needs at least one request")
        prepared = []
        worst_usd = 0.0
        worst_tokens = 0
        cap = max_tokens_cap(scope, settings.max_tokens_cap)
        for index, item in enumerate(requests):
            if not is_batch_request(item):
                raise ConfigError(f"batch request {index} must be {{'custom_id': ..., 'params': {{...}}}}")
            params = dict(item["params"])
            model = params.get("model") or (scope.models or settings.models)[0]
            state.prices.check([model])
            params["model"] = model
            params["max_tokens"] = clamp_max_tokens(params.get("max_tokens"), cap)
            bound = upper_bound_tokens(params)
            worst_usd += state.prices.worst_case_usd([model], bound, params["max_tokens"], batch=True)
            worst_tokens += bound + params["max_tokens"]
            prepared.append({"custom_id": item["custom_id"], "params": params})

        reservation, _ = state.budgets.reserve_worst(scope, math.ceil(worst_usd * MICRO), worst_tokens,
                                                     hold_seconds=BATCH_HOLD_SECONDS)
        sdk_batches: Any = state.client.messages.batches
        try:
            batch = self._passthrough(lambda timeout: sdk_batches.create(requests=prepared, timeout=timeout,
                                                                         **kwargs))
        except BaseException:
            if reservation is not None:
                state.budgets.settle(reservation, 0.0, 0)  # nothing was submitted: give the room back
            raise
        record = {"state": "pending", "feature": scope.feature, "route": scope.route,
                  "user": state.events.user(scope.user), "submitted_at": state.clock.time(),
                  "models": sorted({p["params"]["model"] for p in prepared}),
                  "reservation": asdict(reservation) if reservation is not None else None}
        self._put(batch.id, record)
        state.events.emit("batch_submitted", {"batch_id": batch.id, "feature": scope.feature, "route": scope.route,
                                              "requests": len(prepared), "reserved_usd": round(worst_usd, 8)})
        return batch

    def retrieve(self, batch_id: str, **kwargs: Any) -> Any:
        return self._passthrough(lambda timeout: self._state.client.messages.batches.retrieve(
            batch_id, timeout=timeout, **kwargs))

    def cancel(self, batch_id: str, **kwargs: Any) -> Any:
        return self._passthrough(lambda timeout: self._state.client.messages.batches.cancel(
            batch_id, timeout=timeout, **kwargs))

    def list(self, **kwargs: Any) -> Any:
        return self._passthrough(lambda timeout: self._state.client.messages.batches.list(timeout=timeout, **kwargs))

    def results(self, batch_id: str, **kwargs: Any) -> Iterator[Any]:
        """Each result as the SDK gives it; the first complete read is costed, logged and settled."""
        state = self._state
        record = self._get(batch_id)
        counted = record is None or record.get("state") != "settled"
        feature = record.get("feature") if record else current_scope().feature
        route = record.get("route") if record else current_scope().route
        user = record.get("user") if record else state.events.user(current_scope().user)
        total_usd = 0.0
        total_tokens = 0
        rollup: Counter[str] = Counter()
        decoder = self._passthrough(lambda timeout: state.client.messages.batches.results(
            batch_id, timeout=timeout, **kwargs))
        for item in decoder:
            result = item.result
            if counted and result.type == "succeeded":
                message = result.message
                # Priced as of submission: a price change while the batch ran does not reach it.
                cost = state.prices.cost(message.model, message.usage, batch=True,
                                         at=record.get("submitted_at") if record else None)
                total_usd += cost.usd
                total_tokens += (cost.input_tokens + cost.output_tokens + cost.cache_read_input_tokens
                                 + cost.cache_creation_input_tokens)
                state.events.emit("claude_api_call", {
                    **_line(feature, route, user, message.model, batch_id, item.custom_id),
                    "input_tokens": cost.input_tokens, "output_tokens": cost.output_tokens,
                    "cache_read_input_tokens": cost.cache_read_input_tokens,
                    "cache_creation_input_tokens": cost.cache_creation_input_tokens,
                    "stop_reason": message.stop_reason, "cost_usd": round(cost.usd, 8)})
                rollup.update(call_fields(
                    feature=feature, model=message.model, error_type=None, fallback=False, retries=0,
                    input_tokens=cost.input_tokens, output_tokens=cost.output_tokens,
                    cache_read=cost.cache_read_input_tokens, cache_creation=cost.cache_creation_input_tokens,
                    cost_usd=cost.usd, latency_s=None))
            elif counted:
                state.events.emit("claude_api_error", {
                    **_line(feature, route, user, _only_model(record), batch_id, item.custom_id),
                    "error_type": f"batch_{result.type}", "status_code": None})
                rollup.update(call_fields(
                    feature=feature, model=None, error_type=f"batch_{result.type}", fallback=False, retries=0,
                    input_tokens=0, output_tokens=0, cache_read=0, cache_creation=0, cost_usd=0.0, latency_s=None))
            yield item
        if counted:
            self._settle(batch_id, record, total_usd, total_tokens, dict(rollup))

    # --- internals ----------------------------------------------------------------------------

    def _settle(self, batch_id: str, record: dict[str, Any] | None, usd: float, tokens: int,
                rollup: dict[str, int] | None = None) -> None:
        state = self._state
        held = (record or {}).get("reservation")
        reservation: Reservation | None
        if held is not None:
            reservation = Reservation(held["rid"], [Line(**line) for line in held["lines"]], held["usd_lines"],
                                      held.get("app_wide", []))
        else:
            # No hold on record (another store, or none was needed): count the spend all the same.
            scope = current_scope()
            if record is not None:
                scope.feature = record.get("feature")
            lines, usd_idx, app_wide = state.budgets.budget_lines(scope, scope.budgets, usd=0, tokens=0,
                                                                  now=state.clock.time())
            reservation = Reservation("unheld", lines, usd_idx, sorted(app_wide)) if lines else None
        if reservation is not None:
            state.budgets.settle(reservation, usd, tokens, rollup=rollup)
        else:
            state.rollups.write(rollup)
        self._put(batch_id, {**(record or {}), "state": "settled", "cost_usd": usd})
        state.events.emit("batch_settled", {"batch_id": batch_id, "cost_usd": round(usd, 8)})

    def _put(self, batch_id: str, record: dict[str, Any]) -> None:
        try:
            self._state.store.put_record(f"batch:{batch_id}", json.dumps(record), RECORD_TTL_SECONDS)
        except StorageUnavailable:
            self._state.events.emit("storage_unavailable", {"error_type": "batch record", "policy": "open"},
                                    level="ERROR")

    def _get(self, batch_id: str) -> dict[str, Any] | None:
        try:
            raw = self._state.store.get_record(f"batch:{batch_id}")
        except StorageUnavailable:
            return None
        return None if raw is None else dict(json.loads(raw))

    def _passthrough(self, send: Any) -> Any:
        call = Call.bare(self._state, current_scope(), "batch")
        try:
            return self._runner.run_chain(call, lambda _model, timeout: send(timeout))
        except BaseException as exc:
            raise self._runner.as_guard_error(call, exc) from None


def _line(feature: str | None, route: str | None, user: str | None, model: str | None, batch_id: str,
          custom_id: str) -> dict[str, Any]:
    """A batch result's log line has every field a call's line has (events.CALL_FIELDS), so one jq
    or one dashboard reads both; what a batch cannot know (latency, request id) is null."""
    return {"request_id": None, "feature": feature, "route": route, "user": user, "model": model,
            "requested_model": model, "fallback_from": None, "input_tokens": 0, "output_tokens": 0,
            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "latency_ms": None, "retries": 0,
            "stop_reason": None, "cost_usd": 0.0, "system_prompt_hash": None, "batch_id": batch_id,
            "custom_id": custom_id}


def _only_model(record: dict[str, Any] | None) -> str | None:
    """The model of a failed batch request: known when the whole batch asked one model."""
    models = (record or {}).get("models") or []
    return str(models[0]) if len(models) == 1 else None
