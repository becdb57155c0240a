"""The one lookup of an app's flask-claude state, ``app.extensions["claude"]``.

Its own module so that the request pipeline, the CLI, the dashboard and the decorators can find the
state without importing the extension (which imports them).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, overload

from flask import current_app, has_app_context

if TYPE_CHECKING:
    from .extension import ClaudeState

EXTENSION_KEY = "claude"


def quart_globals() -> ModuleType | None:
    """The ``quart`` module when the current code runs inside a Quart app context, else None."""
    module = sys.modules.get("quart")
    if module is None or not module.has_app_context():
        return None
    return module


def is_quart_app(app: Any) -> bool:
    module = sys.modules.get("quart")
    return module is not None and isinstance(app, module.Quart)


def current_app_or_none() -> Any:
    """The app of the current context: Flask's, or Quart's when the code runs in a Quart app."""
    if has_app_context():
        return current_app._get_current_object()  # type: ignore[attr-defined]
    quart = quart_globals()
    if quart is not None:
        return quart.current_app._get_current_object()
    return None


@overload
def state_for(app: Any = None, *, required: Literal[True] = True) -> ClaudeState: ...


@overload
def state_for(app: Any = None, *, required: bool) -> ClaudeState | None: ...


def state_for(app: Any = None, *, required: bool = True) -> ClaudeState | None:
    """The ``ClaudeState`` of ``app`` (default: the current Flask or Quart app): the one lookup of it.

    With ``required=False`` an app without flask-claude (or no app at all) gives None instead of
    ``RuntimeError``: for hooks that run on every request and commands that say it themselves.
    """
    if app is None:
        app = current_app_or_none()
        if app is None:
            if not required:
                return None
            raise RuntimeError("flask-claude needs an app context: call it inside a request, "
                               "or inside `with app.app_context():`.")
    state: ClaudeState | None = app.extensions.get(EXTENSION_KEY)
    if state is None and required:
        raise RuntimeError(f"flask-claude is not initialised on app {app.name!r}: "
                           "call Claude(app) or claude.init_app(app).")
    return state
