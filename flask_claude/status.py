"""What the app is doing now: flags, breakers, today's budgets and the shared rollups, read live.

``collect_status`` reads the app's flag provider and storage (on Redis: what every worker shares;
on ``memory://`` only this process's own state); ``flask claude status`` prints it with
``render_status`` and the dashboard (``dashboard.py``) draws it. The numbers of the calls come from
``summary.ops_summary``, so the terminal, the page and its JSON can never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from flask import Flask

from .decorators import _SPEC_ATTR
from .periods import period_bounds
from .storage import StorageUnavailable
from .summary import ops_summary

if TYPE_CHECKING:
    from .decorators import ViewSpec
    from .extension import ClaudeState


def _specs(view: Any) -> Iterator[ViewSpec]:
    """The specs on a view: the function itself (or what it wraps) and a class-based view's methods."""
    fn, depth = view, 0
    while fn is not None and depth < 32:
        spec = getattr(fn, _SPEC_ATTR, None)
        if spec is not None:
            yield spec
            break
        fn, depth = getattr(fn, "__wrapped__", None), depth + 1
    view_class = getattr(view, "view_class", None)
    if view_class is not None:  # MethodView with @ai_feature on ``post`` rather than in ``decorators``
        names = {"dispatch_request", *(m.lower() for m in getattr(view_class, "methods", None) or ())}
        for name in sorted(names):
            spec = getattr(getattr(view_class, name, None), _SPEC_ATTR, None)
            if spec is not None:
                yield spec


def _features(app: Flask) -> dict[str, dict[str, Any]]:
    features: dict[str, dict[str, Any]] = {}
    for endpoint, view in sorted(app.view_functions.items()):
        for spec in _specs(view):
            feature = spec.feature
            if feature is None:
                continue
            key = feature.name
            if key in features and features[key]["flag"] != feature.flag_name:
                key = f"{feature.name}@{endpoint}"  # same name, another flag: both must be visible
            entry = features.setdefault(key, {"feature": feature.name, "flag": feature.flag_name,
                                              "models": list(feature.models or ()), "endpoints": [],
                                              "routes": []})
            if endpoint not in entry["endpoints"]:
                entry["endpoints"].append(endpoint)
                for rule in app.url_map.iter_rules(endpoint):
                    methods = ",".join(sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}))
                    entry["routes"].append(f"{methods} {rule.rule}".strip())
    return features


def safe_uri(uri: str) -> str:
    """The storage URI without its credentials: status output ends up in tickets and chat. The whole
    user part goes, up to the last ``@`` before the path (a password may hold ``@`` and ``:``), and
    so does a ``password=`` in the query."""
    head, sep, query = uri.partition("?")
    scheme, found, rest = head.partition("://")
    if found:
        path_at = rest.find("/", rest.rfind("@") + 1)
        netloc, path = (rest, "") if path_at < 0 else (rest[:path_at], rest[path_at:])
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        head = f"{scheme}://{netloc}{path}"
    if sep:
        query = re.sub(r"(?i)((?:^|&)(?:password|username)=)[^&]*", r"\1***", query)
    return head + sep + query


def _flag(state: ClaudeState, flag: str) -> bool | None:
    try:
        return bool(state.flags.enabled(flag, None, state.settings.flag_default))
    except Exception:  # a provider must not raise, but a status page must not die if one does
        return None


def collect_status(state: ClaudeState, app: Flask, *, series: bool = False) -> dict[str, Any]:
    """Flags, breakers, today's budgets and the shared rollups, read from the app's provider and storage."""
    settings = state.settings
    now = state.clock.time()
    uri = settings.storage_uri
    storage: dict[str, Any] = {"uri": safe_uri(uri), "shared": not uri.startswith("memory://"), "ok": True,
                               "error": None, "failure_policy": settings.storage_failure}

    global_on = _flag(state, settings.global_flag)
    features = _features(app)
    for entry in features.values():
        entry["enabled"] = _flag(state, entry["flag"])
        entry["serving"] = bool(global_on) and bool(entry["enabled"])

    pid, ends = period_bounds("day", 1, now, ZoneInfo(settings.budget_timezone))
    budgets: dict[str, Any] = {"day": pid, "timezone": settings.budget_timezone,
                               "resets_at": datetime.fromtimestamp(ends, UTC).isoformat(timespec="seconds"),
                               "resets_in_s": round(ends - now),
                               "thresholds": list(settings.budget_alerts), "items": []}
    try:
        items = state.budgets.usage_report(now)
    except StorageUnavailable as exc:
        storage.update(ok=False, error=f"storage unavailable ({exc})")
    except Exception as exc:  # never a traceback on an operator's terminal
        storage.update(ok=False, error=f"could not read budgets ({type(exc).__name__}: {exc})")
    else:
        for item in items:
            item["exhausted"] = item["spent_usd"] >= item["limit_usd"]
        budgets["items"] = items

    models = list(dict.fromkeys([*settings.models, *(m for f in features.values() for m in f["models"])]))
    breakers: dict[str, str] = {}
    for model in models:
        if not storage["ok"]:
            breakers[model] = "unknown"  # don't wait out a socket timeout per model on a dead store
            continue
        breakers[model] = state.breaker.state(model, now)
        if breakers[model] == "unknown":  # the breaker swallows outages (calls go through); we report them
            storage.update(ok=False, error="storage unavailable (breaker state could not be read)")
    cap = settings.max_concurrency
    pacing: dict[str, Any] = {"mode": settings.pacing, "wait_s": settings.pacing_wait, "max_concurrency": cap,
                              "models": state.pacer.snapshot(models) if storage["ok"] else {}}
    ops: dict[str, Any] | None = None
    if storage["ok"]:
        try:
            ops = ops_summary(state, now, series=series)
        except StorageUnavailable as exc:
            storage.update(ok=False, error=f"storage unavailable ({exc})")
    return {
        "app": app.name,
        "storage": storage,
        "flags": {"provider": type(state.flags).__name__,
                  "global": {"flag": settings.global_flag, "enabled": global_on}},
        "features": features,
        "breakers": breakers,
        "budgets": budgets,
        "pacing": pacing,
        "ops": ops,
    }


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _duration(seconds: float) -> str:
    minutes = max(0, int(seconds)) // 60
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _onoff(value: bool | None) -> str:
    return "unknown" if value is None else ("on" if value else "OFF")


def render_status(status: dict[str, Any]) -> str:
    storage = status["storage"]
    out = [f"flask-claude status: app {status['app']}, storage {storage['uri']}"]
    if not storage["ok"]:
        policy = ("calls go through without limits or budgets" if storage["failure_policy"] == "open"
                  else "AI features answer 503")
        out.append(f"!! {storage['error']}: breakers and budgets could not be read (flags below are live). "
                   f"Meanwhile {policy} (CLAUDE_STORAGE_FAILURE={storage['failure_policy']}).")
    elif not storage["shared"]:
        out.append("note: memory:// storage is per process, so this command sees only its own empty state, "
                   "not the workers'. Use CLAUDE_STORAGE_URI=redis://... to share and inspect it.")
    out.append("")
    flags = status["flags"]
    out.append(f"Flags ({flags['provider']}, evaluated for an anonymous user)")
    rows = [(f"{flags['global']['flag']}", "(global switch)", _onoff(flags["global"]["enabled"]))]
    for name, entry in status["features"].items():
        where = ", ".join(entry["routes"]) or ", ".join(entry["endpoints"])
        state = _onoff(entry["enabled"])
        if entry["enabled"] and not entry["serving"]:
            state += " (global switch off)"
        rows.append((entry["flag"], f"{name}: {where}", state))
    if not status["features"]:
        rows.append(("-", "no view decorated with @ai_feature", ""))
    width = max(len(r[0]) for r in rows) + 2
    swidth = max(len(r[2]) for r in rows) + 2
    out += [f"  {flag:<{width}}{state:<{swidth}}{what}" for flag, what, state in rows]
    out.append("")
    out.append("Circuit breakers")
    mwidth = max([len(m) for m in status["breakers"]] + [5]) + 2
    out += [f"  {model:<{mwidth}}{state.upper() if state != 'closed' else state}"
            for model, state in status["breakers"].items()]
    out.append("")
    budgets = status["budgets"]
    out.append(f"Budgets today ({budgets['day']} {budgets['timezone']}, resets in {_duration(budgets['resets_in_s'])}; "
               f"alerts at {', '.join(map(_pct, budgets['thresholds'])) or 'none'})")
    if not storage["ok"]:
        out.append("  unknown (storage unavailable)")
    elif not budgets["items"]:
        out.append("  no app-wide budget configured (CLAUDE_DAILY_BUDGET_USD, CLAUDE_FEATURE_BUDGETS_USD); "
                   "spend is in the log: flask claude report --since today")
    for item in budgets["items"]:
        passed = ", ".join(map(_pct, item["alerts_passed"])) or "none"
        flag = "  EXHAUSTED" if item["exhausted"] else ""
        out.append(f"  {item['budget']}: spent ${item['spent_usd']:.4f} of ${item['limit_usd']:.2f}, "
                   f"reserved ${item['reserved_usd']:.4f}, remaining ${item['remaining_usd']:.4f}; "
                   f"alerts passed: {passed}{flag}")
    out += ["", *_render_pacing(status.get("pacing"))]
    ops = status.get("ops")
    if ops is not None:
        out += ["", *_render_ops(ops, storage["shared"])]
    return "\n".join(out)


def _render_pacing(pacing: dict[str, Any] | None) -> list[str]:
    """What the upstream's rate-limit headers last said per model, and the concurrency queue."""
    if not pacing:
        return []
    cap = pacing["max_concurrency"]
    out = [f"Upstream rate limits (CLAUDE_PACING={pacing['mode']}, wait up to {pacing['wait_s']:g} s; "
           f"max concurrency: {cap if cap is not None else 'unlimited'})"]
    if not pacing["models"]:
        out.append("  nothing known yet (no response with anthropic-ratelimit-* headers recently)")
    for model, entry in pacing["models"].items():
        dims = ", ".join(f"{d} {v['remaining']:g}/{v['limit']}" for d, v in sorted(entry["limits"].items()))
        out.append(f"  {model}: {dims or 'no limits reported'}; in flight (leases) {entry['leases']}, "
                   f"queued {entry['queued']}")
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _stats_line(stats: dict[str, Any]) -> str:
    rate = "-" if stats["error_rate"] is None else _pct(round(stats["error_rate"], 4))
    return (f"{stats['calls']:g} calls, {stats['errors']:g} errors ({rate}), {stats['fallbacks']:g} fallbacks, "
            f"${stats['cost_usd']:.4f}; latency p50 {_seconds(stats['latency_p50_s'])} "
            f"p95 {_seconds(stats['latency_p95_s'])} p99 {_seconds(stats['latency_p99_s'])}")


def _render_ops(ops: dict[str, Any], shared: bool) -> list[str]:
    window = ops["window"]
    whose = "all workers" if shared else "this process"
    out = [f"Calls ({whose}), last {window['seconds']:g} s: {_stats_line(window)}",
           f"Calls ({whose}), last 24 h: {_stats_line(ops['last_24h'])}"]
    for feature, entry in ops["last_24h"]["by_feature"].items():
        degraded = ", ".join(f"{k} {v:g}" for k, v in entry["degraded"].items())
        out.append(f"  {feature}: {entry['calls']:g} calls, {entry['errors']:g} errors, "
                   f"${entry['cost_usd']:.4f}" + (f"; degraded: {degraded}" if degraded else ""))
    firing = ops["alerts"]["firing"]
    out.append("Alerts firing: " + (", ".join(f"{a['alert']} ({a.get('value')} > {a.get('threshold')})"
                                              for a in firing) or "none"))
    return out
