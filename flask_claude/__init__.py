"""flask-claude: the production layer for Claude calls in a Flask app."""

from .aiconfig import FeatureAIConfig
from .body import request_json
from .decorators import ai_feature, budgeted, fallback_to
from .errors import (
    BudgetExceeded,
    CallLimitExceeded,
    ClaudeGuardError,
    ConfigError,
    FeatureDisabled,
    InputTooLarge,
    InvalidOutput,
    InvalidRequest,
    LimitExceeded,
    RateLimitedUpstream,
    TruncatedResponse,
    UnknownModel,
    UpstreamUnavailable,
)
from .extension import Claude
from .flags import EnvFlags, FlagProvider, LaunchDarklyFlags, StaticFlags, UserContext
from .hygiene import prune_history, user_content
from .signals import budget_alert, circuit_opened, claude_called, feature_degraded, model_fallback, ops_alert

__all__ = [
    "BudgetExceeded",
    "CallLimitExceeded",
    "Claude",
    "ClaudeGuardError",
    "ConfigError",
    "EnvFlags",
    "FeatureAIConfig",
    "FeatureDisabled",
    "FlagProvider",
    "InputTooLarge",
    "InvalidOutput",
    "InvalidRequest",
    "LaunchDarklyFlags",
    "LimitExceeded",
    "RateLimitedUpstream",
    "StaticFlags",
    "TruncatedResponse",
    "UnknownModel",
    "UpstreamUnavailable",
    "UserContext",
    "ai_feature",
    "budget_alert",
    "budgeted",
    "circuit_opened",
    "claude_called",
    "fallback_to",
    "feature_degraded",
    "model_fallback",
    "ops_alert",
    "prune_history",
    "request_json",
    "user_content",
]
