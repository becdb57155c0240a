"""How a budget alert is announced: a log line, the ``budget_alert`` signal and ``CLAUDE_ALERT_HOOK``.

``budget.Budgets`` decides when (a threshold first crossed, claimed once per app-wide budget and
period across all workers by the storage scripts); this says what everyone is told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .signals import budget_alert
from .storage import MICRO

if TYPE_CHECKING:
    from .extension import ClaudeState
    from .storage import Line


def announce(state: ClaudeState, line: Line, threshold: float, spent: int, unit_usd: bool) -> None:
    """Log, signal and call the hook for one crossed threshold.

    The 1.0 alert fires when the budget is exhausted: when spend reaches the limit or, since a
    reservation never lets it pass, when spent alone leaves no room for the next call.
    """
    fields: dict[str, Any] = {"budget": line.name, "threshold": threshold,
                              "spent": spent / MICRO if unit_usd else spent,
                              "limit": line.limit / MICRO if unit_usd else line.limit,
                              "unit": "usd" if unit_usd else "tokens"}
    state.events.emit("budget_alert", fields, level="ERROR" if threshold >= 1.0 else "WARNING")
    budget_alert.send(state.app, **fields)
    hook = state.settings.alert_hook
    if hook is not None:
        try:
            hook(fields)
        except Exception as exc:  # an alert hook failing must not fail the user's request
            state.events.emit("alert_hook_failed", {"error_type": type(exc).__name__}, level="ERROR")
