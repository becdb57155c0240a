"""The errors a guarded call can raise.

Every guard error knows the HTTP status and the ``X-Claude-Degraded`` reason it turns into, so the
pipeline can answer without a table of its own, and a public message that is safe to show a user:
the upstream message, request id and key never reach it.
"""

from __future__ import annotations


class ClaudeGuardError(Exception):
    """Base of every error flask-claude raises on purpose."""

    status: int = 503
    reason: str = "upstream_unavailable"
    public_message: str = "This AI feature is temporarily unavailable."

    def __init__(self, message: str | None = None, *, reason: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message or self.public_message)
        if reason is not None:
            self.reason = reason
        self.retry_after = retry_after
        self.headers: dict[str, str] = {}

    def with_status(self, status: int) -> ClaudeGuardError:
        """The same refusal answered with another status (an app-wide budget pauses a feature: 503)."""
        self.status = status
        return self


class ConfigError(ClaudeGuardError, ValueError):
    """A ``CLAUDE_*`` setting is wrong; raised at startup, never per request."""

    status = 500
    reason = "config_error"


class FeatureDisabled(ClaudeGuardError):
    status = 503
    reason = "feature_disabled"
    public_message = "This AI feature is turned off right now."


class LimitExceeded(ClaudeGuardError):
    status = 429
    reason = "rate_limited"
    public_message = "Too many requests; try again later."


class CallLimitExceeded(LimitExceeded):
    """More Claude calls in one request than ``ai_feature(max_calls=N)`` allows: a runaway agent loop."""

    status = 503
    reason = "max_calls_exceeded"
    public_message = "This AI feature is temporarily unavailable."


class BudgetExceeded(ClaudeGuardError):
    """A budget has no room for the call's worst case; nothing was reserved or sent.

    Per-user budgets answer 429 (the user waits for the period to reset); app-wide budgets
    answer 503 (the feature is paused for everyone), which the reservation step decides.
    """

    status = 429
    reason = "budget_exceeded"
    public_message = "The AI budget for this period is used up; try again later."


class UpstreamUnavailable(ClaudeGuardError):
    status = 503
    reason = "upstream_unavailable"
    public_message = "The AI service is temporarily unavailable; try again soon."


class RateLimitedUpstream(ClaudeGuardError):
    """The upstream's rate limit (or the concurrency cap) leaves no room within the wait allowed.

    429 with ``Retry-After`` (when the room comes back): like the API's own answer, the client should
    come back later; nothing was sent upstream.
    """

    status = 429
    reason = "rate_limited_upstream"
    public_message = "The AI service is busy right now; try again shortly."


class InputTooLarge(ClaudeGuardError):
    status = 413
    reason = "input_too_large"
    public_message = "The input is too large."


class TruncatedResponse(ClaudeGuardError):
    status = 503
    reason = "truncated"
    public_message = "The AI reply was incomplete; try again soon."


class InvalidOutput(ClaudeGuardError):
    status = 503
    reason = "invalid_output"
    public_message = "The AI reply could not be used; try again soon."


class UnknownModel(ConfigError):
    """A model with no price: it would otherwise be billed as $0 and slip past every budget."""

    status = 503
    reason = "unknown_model"


class InvalidRequest(ClaudeGuardError):
    """The caller sent something that cannot be turned into a Claude request: theirs to fix, so 400.

    A body that is not usable JSON (``request_json``, or ``request.json`` nested too deeply), or a
    request the SDK cannot build: text the JSON encoder refuses (a lone surrogate such as
    ``"\\ud800"``), a value it cannot serialise, or an argument the SDK rejects. Nothing was sent.
    """

    status = 400
    reason = "invalid_request"
    public_message = "The request contains text or values that cannot be processed."


class StorageDown(ClaudeGuardError):
    """The shared storage is down and ``CLAUDE_STORAGE_FAILURE="closed"``: AI routes degrade."""

    status = 503
    reason = "storage_unavailable"
    public_message = "This AI feature is temporarily unavailable."
