"""What flask-claude does on a Quart app: ``claude.async_messages`` and the guard-error handler.

Quart keeps its application and request contexts in context variables of its own, so Flask's
``current_app``, ``g`` and ``request`` are unbound inside a Quart view. flask-claude finds the app and
the route through Quart's globals when Flask has none (``quart_globals``); Quart is never imported
unless the app already imported it.

The decorators are not supported on Quart: their pipeline (flags, limits, the view, the fallback
response and its cache) is written against Flask's request and response objects and runs the view
synchronously through ``ensure_sync``; on Quart it would need an awaitable twin of every step.
``quart_example/`` shows the pattern instead: ``claude.async_messages`` in the view, and the
fallback answered from ``ClaudeGuardError`` (or left to the handler registered here, which answers
the JSON error with ``X-Claude-Degraded``).
"""

from __future__ import annotations

from typing import Any

from .context import current_scope
from .degrade import decorate, public_body, record_degradation
from .errors import ClaudeGuardError
from .state import state_for


async def handle_guard_error(exc: ClaudeGuardError) -> Any:
    """Quart's version of ``degrade.handle_guard_error``: the same body, headers, log line and signal."""
    import quart  # only ever called inside a Quart app, so installed

    state = state_for(required=False)  # finds the Quart app through its own globals
    status = state.settings.degraded_status if state is not None and exc.status == 503 else exc.status
    response = decorate(quart.jsonify(public_body(exc)), exc, status)  # type: ignore[arg-type]
    if state is not None:
        record_degradation(state, current_scope(), exc, response.status_code)
    return response
