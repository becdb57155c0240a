"""flask-claude: the production layer for Claude calls in a Flask app."""

from .decorators import ai_feature, budgeted, fallback_to
from .errors import (
    BudgetExceeded,
    ClaudeGuardError,
    ConfigError,
    FeatureDisabled,
    InputTooLarge,
    InvalidOutput,
    LimitExceeded,
    TruncatedResponse,
    UnknownModel,
    UpstreamUnavailable,
)
from .extension import Claude
from .signals import budget_alert, circuit_opened, claude_called, feature_degraded, model_fallback

__all__ = [
    "BudgetExceeded",
    "Claude",
    "ClaudeGuardError",
    "ConfigError",
    "FeatureDisabled",
    "InputTooLarge",
    "InvalidOutput",
    "LimitExceeded",
    "TruncatedResponse",
    "UnknownModel",
    "UpstreamUnavailable",
    "ai_feature",
    "budget_alert",
    "budgeted",
    "circuit_opened",
    "claude_called",
    "fallback_to",
    "feature_degraded",
    "model_fallback",
]
