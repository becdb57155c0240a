"""Flask-style blinker signals, so apps hook alerts and metrics without subclassing anything.

Each is sent with the Flask app as sender and the same fields as the matching log event.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

claude_called = _signals.signal("claude-called")
model_fallback = _signals.signal("model-fallback")
circuit_opened = _signals.signal("circuit-opened")
budget_alert = _signals.signal("budget-alert")
feature_degraded = _signals.signal("feature-degraded")
ops_alert = _signals.signal("ops-alert")
