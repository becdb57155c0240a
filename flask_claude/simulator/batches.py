"""The Message Batches endpoints: create, retrieve (which moves a batch along), results, cancel,
delete and list, with the API's pagination.

A batch ends after a set number of retrieves rather than after some time, so tests poll a known
number of times and never wait.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..clock import Clock
from .wire import InvalidRequest, NotFound, json_bytes, rfc3339

#: Runs one request of a batch: its (unvalidated) params in, the reply's message JSON out; raises
#: :class:`InvalidRequest` for params the API would refuse.
RunRequest = Callable[[dict[str, Any]], dict[str, Any]]

_NO_COUNTS = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}

BATCH_PATH = re.compile(r"^/v1/messages/batches/(?P<id>[^/]+)(?P<rest>/results|/cancel)?$")


def is_batch_path(path: str) -> bool:
    return path == "/v1/messages/batches" or BATCH_PATH.match(path) is not None


@dataclass
class _Batch:
    id: str
    created_at: float
    requests: list[dict[str, Any]]
    polls: int = 0
    status: Literal["in_progress", "canceling", "ended"] = "in_progress"
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    results: list[dict[str, Any]] | None = None
    counts: dict[str, int] = field(default_factory=dict)


class BatchStore:
    """Every batch a simulator holds; answers the batch endpoints as JSON payloads (or JSONL bytes)."""

    def __init__(self, clock: Clock, run: RunRequest, new_id: Callable[[str], str]) -> None:
        self.clock = clock
        self._run = run
        self._new_id = new_id
        self._lock = threading.RLock()
        self._batches: dict[str, _Batch] = {}

    def clear(self) -> None:
        with self._lock:
            self._batches.clear()

    def handle(self, method: str, path: str, body: Any, args: Mapping[str, str], url_root: str,
               polls_until_done: int) -> dict[str, Any] | bytes:
        """Answer one batch request: a JSON payload, or the results file as bytes.

        ``url_root`` is where the request came in (host and any mount), so ``results_url`` points
        back through the same transport or server. Raises :class:`InvalidRequest` or :class:`NotFound`.
        """
        if path == "/v1/messages/batches":
            if method == "POST":
                return self._batch_json(self._create(body, polls_until_done), url_root)
            if method == "GET":
                return self._list(args, url_root)
            raise NotFound(f"Not found: {method} {path}")
        match = BATCH_PATH.match(path)
        assert match is not None
        batch_id, rest = match["id"], match["rest"]
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                raise NotFound(f"message batch {batch_id!r} not found")
            if rest is None and method == "GET":
                batch.polls += 1
                if batch.polls >= polls_until_done:
                    self._end(batch)
                return self._batch_json(batch, url_root)
            if rest is None and method == "DELETE":
                if batch.status != "ended":
                    raise InvalidRequest("A batch can only be deleted once it has ended; cancel it first")
                del self._batches[batch_id]
                return {"id": batch_id, "type": "message_batch_deleted"}
            if rest == "/cancel" and method == "POST":
                if batch.status == "in_progress":
                    batch.status = "canceling"
                    batch.cancel_initiated_at = self.clock.time()
                return self._batch_json(batch, url_root)
            if rest == "/results" and method == "GET":
                if batch.results is None:
                    raise InvalidRequest(f"Batch {batch_id} is still processing; no results yet")
                return b"".join(json_bytes(line) + b"\n" for line in batch.results)
        raise NotFound(f"Not found: {method} {path}")

    def _create(self, body: Any, polls_until_done: int) -> _Batch:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise InvalidRequest("requests: at least one request is required")
        seen: set[str] = set()
        for index, item in enumerate(requests):
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
                raise InvalidRequest(f"requests.{index}.custom_id: Field required")
            if not isinstance(item.get("params"), dict):
                raise InvalidRequest(f"requests.{index}.params: Field required")
            if item["custom_id"] in seen:
                raise InvalidRequest(f"requests.{index}.custom_id: duplicate custom_id {item['custom_id']!r}")
            seen.add(item["custom_id"])
        batch = _Batch(id=self._new_id("msgbatch_sim_"), created_at=self.clock.time(), requests=requests)
        with self._lock:
            self._batches[batch.id] = batch
            if polls_until_done == 0:
                self._end(batch)
        return batch

    def _end(self, batch: _Batch) -> None:
        """Run every request of the batch (or cancel them all) and freeze the results."""
        if batch.status == "ended":
            return
        results: list[dict[str, Any]] = []
        counts = dict(_NO_COUNTS)
        for item in batch.requests:
            if batch.status == "canceling":
                result: dict[str, Any] = {"type": "canceled"}
            else:
                try:
                    result = {"type": "succeeded", "message": self._run(item["params"])}
                except InvalidRequest as exc:
                    error = {"type": "invalid_request_error", "message": str(exc)}
                    result = {"type": "errored", "error": {"type": "error", "error": error, "request_id": None}}
            counts[result["type"]] += 1
            results.append({"custom_id": item["custom_id"], "result": result})
        batch.results, batch.counts = results, counts
        batch.status, batch.ended_at = "ended", self.clock.time()

    def _batch_json(self, batch: _Batch, url_root: str) -> dict[str, Any]:
        counts = batch.counts or {**_NO_COUNTS, "processing": len(batch.requests)}
        results_url = None
        if batch.status == "ended":
            # Absolute like the real API's; built from the request (host and any SCRIPT_NAME mount)
            # so the SDK fetches it through the same transport or server.
            results_url = f"{url_root}v1/messages/batches/{batch.id}/results"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": dict(counts),
            "created_at": rfc3339(batch.created_at),
            "expires_at": rfc3339(batch.created_at + 24 * 3600),
            "ended_at": rfc3339(batch.ended_at),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(batch.cancel_initiated_at),
            "results_url": results_url,
        }

    def _list(self, args: Mapping[str, str], url_root: str) -> dict[str, Any]:
        try:
            limit = int(args.get("limit", "20"))
        except ValueError:
            raise InvalidRequest("limit: Input should be a valid integer") from None
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit: Input should be between 1 and 1000")
        with self._lock:
            batches = list(reversed(self._batches.values()))  # most recent first, like the API
            ids = [b.id for b in batches]
            after, before = args.get("after_id"), args.get("before_id")
            if after in ids:
                batches = batches[ids.index(after) + 1 :]
                page = batches[:limit]
            elif before in ids:
                batches = batches[: ids.index(before)]
                page = batches[-limit:]
            else:
                page = batches[:limit]
            has_more = len(batches) > limit
            data = [self._batch_json(b, url_root) for b in page]
        return {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
