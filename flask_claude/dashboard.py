"""The ops dashboard: an opt-in page (``CLAUDE_DASHBOARD=True``) over the shared rollups, closed by default.

Why server-drawn SVG and no chart library: the page must work on a host with no internet (no CDN)
and show what every worker and host shares, so it renders the same summary ``flask claude status``
reads (``summary.py``) as plain HTML and SVG, and a few lines of its own JavaScript swap in a fresh
copy every ``REFRESH_S`` seconds. Its data is JSON at ``<prefix>/api/summary`` for scripts.

Access is the app's decision: ``@claude.dashboard_access`` registers a callable run in the request
(truthy: let in). The callable is usually registered after ``init_app`` (it is a decorator on the
extension), so without one the dashboard answers 403 to everyone rather than failing at start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from markupsafe import escape

from .state import state_for
from .status import collect_status

if TYPE_CHECKING:
    from .extension import Claude

REFRESH_S = 10
COLORS = ("#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626")


def register_dashboard(app: Flask, extension: Claude, prefix: str) -> None:
    bp = Blueprint("claude_dashboard", __name__, url_prefix=prefix or None)

    @bp.before_request
    def _gate() -> Response | None:
        check = extension._dashboard_access
        allowed = False
        if check is not None:
            allowed = bool(check())
        if not allowed:
            response = Response("Forbidden: the flask-claude dashboard needs @claude.dashboard_access to let "
                                "you in.\n", status=403, mimetype="text/plain")
            response.headers["Cache-Control"] = "no-store"
            return response
        return None

    @bp.get("/")
    def page() -> Response:
        data = _summary()
        body = _content(data)
        if request.args.get("fragment"):
            response = Response(body, mimetype="text/html")
        else:
            page = _PAGE.replace("{refresh}", str(REFRESH_S * 1000)).replace("{title}", str(escape(data["app"])))
            response = Response(page.replace("{content}", body), mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.get("/api/summary")
    def summary() -> Response:
        response = jsonify(_summary())
        response.headers["Cache-Control"] = "no-store"
        return response

    app.register_blueprint(bp)


def _summary() -> dict[str, Any]:
    state = state_for()
    state.ops_alerts.maybe_evaluate()  # before reading, so a page refresh shows an alert it just found
    return collect_status(state, current_app._get_current_object(), series=True)  # type: ignore[attr-defined]


# --- rendering ------------------------------------------------------------------------------------------


def _fmt_usd(value: float) -> str:
    return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else (f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _card(title: str, inner: str, cls: str = "") -> str:
    return f'<section class="card {cls}"><h2>{escape(title)}</h2>{inner}</section>'


def _content(data: dict[str, Any]) -> str:
    storage = data["storage"]
    ops = data.get("ops")
    parts = []
    if not storage["ok"]:
        parts.append(f'<div class="banner bad">Storage unavailable: {escape(storage["error"] or "")}. '
                     f'Numbers below may be missing.</div>')
    elif not storage["shared"]:
        parts.append('<div class="banner">memory:// storage: this page shows this process only. '
                     'Use Redis to see every worker.</div>')
    firing = ops["alerts"]["firing"] if ops else []
    if firing:
        items = "".join(f"<li><b>{escape(a['alert'])}</b> {escape(_alert_value(a))}</li>" for a in firing)
        parts.append(f'<div class="banner bad" id="alerts-firing">Alerts firing<ul>{items}</ul></div>')
    else:
        parts.append('<div class="banner ok" id="alerts-firing">No alert firing</div>')

    tiles = []
    if ops:
        w = ops["window"]
        label = f"last {w['seconds'] / 60:g} min"
        tiles = [("Calls", f"{round(w['calls']):,}", label), ("Error rate", _pct(w["error_rate"]), label),
                 ("p95 latency", _fmt_s(w["latency_p95_s"]), label),
                 ("Fallbacks", f"{round(w['fallbacks']):,}", label),
                 ("Spend", _fmt_usd(ops["last_24h"]["cost_usd"]), "last 24 h"),
                 ("Calls", f"{round(ops['last_24h']['calls']):,}", "last 24 h")]
    parts.append('<div class="tiles">' + "".join(
        f'<div class="tile"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div>'
        f'<div class="s">{escape(s)}</div></div>' for k, v, s in tiles) + "</div>")

    grid = [_card("Budgets today", _budgets(data["budgets"], storage["ok"]))]
    if ops:
        hour = ops["last_hour"]
        labels = [p["t"][11:16] for p in hour]
        grid.append(_card("Latency, last hour (per minute)", line_chart(
            "latency-chart", labels, [("p50", COLORS[2], [p["latency_p50_s"] for p in hour]),
                                      ("p95", COLORS[1], [p["latency_p95_s"] for p in hour]),
                                      ("p99", COLORS[7], [p["latency_p99_s"] for p in hour])], unit="s"), "wide"))
        grid.append(_card("Spend, last 24 h (per hour, by feature)", _spend_chart(ops), "wide"))
        grid.append(_card("Features, last 24 h", _features(ops)))
        grid.append(_card("Error rate, last hour (per minute)", line_chart(
            "error-chart", labels, [("error rate", COLORS[7], [p["error_rate"] for p in hour])], unit="%"), "wide"))
        grid.append(_card("Degraded responses, last 24 h", _degraded(ops)))
    grid.append(_card("Circuit breakers", _breakers(data["breakers"])))
    if data.get("pacing"):
        grid.append(_card("Upstream rate limits", _pacing(data["pacing"])))
    grid.append(_card("Flags", _flags(data)))
    parts.append('<div class="grid">' + "".join(grid) + "</div>")
    return "".join(parts)


def _alert_value(alert: dict[str, Any]) -> str:
    value, threshold = alert.get("value"), alert.get("threshold")
    if alert["alert"] == "error_rate":
        return f"{_pct(value)} > {_pct(threshold)}"
    if alert["alert"] == "latency_p95":
        return f"{_fmt_s(value)} > {_fmt_s(threshold)}"
    return f"{_fmt_usd(value or 0)} > {_fmt_usd(threshold or 0)} in the window"


def _budgets(budgets: dict[str, Any], ok: bool) -> str:
    if not ok:
        return "<p class=muted>unknown (storage unavailable)</p>"
    if not budgets["items"]:
        return "<p class=muted>No app-wide budget configured.</p>"
    rows = []
    for item in budgets["items"]:
        limit = item["limit_usd"] or 0
        used = (item["spent_usd"] / limit) if limit else 1.0
        held = (item["reserved_usd"] / limit) if limit else 0.0
        cls = "bad" if used >= 0.8 else ""
        rows.append(f'<div class="budget"><div class="row"><span>{escape(item["budget"])}</span>'
                    f'<span>{_fmt_usd(item["spent_usd"])} of {_fmt_usd(limit)}</span></div>'
                    f'<div class="bar"><div class="fill {cls}" style="width:{min(100, used * 100):.1f}%"></div>'
                    f'<div class="held" style="width:{min(100, held * 100):.1f}%"></div></div></div>')
    return "".join(rows) + f'<p class=muted>Resets in {budgets["resets_in_s"] // 3600}h' \
                           f'{budgets["resets_in_s"] % 3600 // 60:02d}m ({escape(budgets["timezone"])}).</p>'


def _features(ops: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{escape(f)}</td><td>{round(e['calls']):,}</td><td>{round(e['errors']):,}</td>"
                   f"<td>{round(e['fallbacks']):,}</td><td>{_fmt_usd(e['cost_usd'])}</td></tr>"
                   for f, e in ops["last_24h"]["by_feature"].items())
    return (f"<table><tr><th>feature</th><th>calls</th><th>errors</th><th>fallbacks</th><th>spend</th></tr>{rows}"
            "</table>" if rows else "<p class=muted>No calls yet.</p>")


def _degraded(ops: dict[str, Any]) -> str:
    reasons = ops["last_24h"]["degraded"]
    rows = "".join(f"<tr><td>{escape(r)}</td><td>{round(n):,}</td></tr>" for r, n in sorted(reasons.items(),
                                                                                    key=lambda x: -x[1]))
    return f"<table><tr><th>reason</th><th>responses</th></tr>{rows}</table>" if rows else \
        "<p class=muted>None.</p>"


def _breakers(breakers: dict[str, str]) -> str:
    rows = "".join(f'<tr><td>{escape(m)}</td><td class="{"bad" if s != "closed" else "ok"}">{escape(s)}</td></tr>'
                   for m, s in breakers.items())
    return f"<table id=breakers>{rows}</table>"


def _pacing(pacing: dict[str, Any]) -> str:
    """What each model's rate limit has left now (the shared pacing state), leases and queue."""
    rows = []
    for model, entry in pacing["models"].items():
        dims = ", ".join(f"{escape(d)} {v['remaining']:g}/{v['limit']}" for d, v in sorted(entry["limits"].items()))
        rows.append(f"<tr><td>{escape(model)}</td><td>{dims or '-'}</td><td>{entry['leases']}</td>"
                    f"<td>{entry['queued']}</td></tr>")
    note = f'<p class=muted>CLAUDE_PACING={escape(pacing["mode"])}</p>'
    if not rows:
        return note + "<p class=muted>Nothing reported yet.</p>"
    return (note + "<table id=pacing><tr><th>model</th><th>left now</th><th>in flight</th><th>queued</th></tr>"
            + "".join(rows) + "</table>")


def _flags(data: dict[str, Any]) -> str:
    def onoff(value: bool | None) -> str:
        return '<span class="muted">unknown</span>' if value is None else (
            '<span class="ok">on</span>' if value else '<span class="bad">OFF</span>')

    g = data["flags"]["global"]
    rows = [f"<tr><td>{escape(g['flag'])}</td><td>global switch</td><td>{onoff(g['enabled'])}</td></tr>"]
    for name, entry in data["features"].items():
        rows.append(f"<tr><td>{escape(entry['flag'])}</td><td>{escape(name)}</td><td>{onoff(entry['enabled'])}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _spend_chart(ops: dict[str, Any]) -> str:
    hours = ops["spend_by_hour"]
    features = sorted({f for h in hours for f in h["usd"]})
    labels = [h["t"][11:16] for h in hours]
    return bar_chart("spend-chart", labels, [(f, COLORS[i % len(COLORS)], [h["usd"].get(f, 0.0) for h in hours])
                                             for i, f in enumerate(features)])


# --- SVG ------------------------------------------------------------------------------------------------

W, H, PAD_L, PAD_B, PAD_T = 640, 200, 52, 24, 10


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _axis(labels: Sequence[str], top: float, unit: str) -> str:
    out = []
    for i in range(5):
        y = PAD_T + (H - PAD_T - PAD_B) * (1 - i / 4)
        v = top * i / 4
        text = f"{v * 100:.3g}%" if unit == "%" else (f"${v:.3g}" if unit == "$" else f"{v:.3g}{unit}")
        out.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(text)}</text>')
    n = len(labels)
    step = max(1, n // 6)
    for i in range(0, n, step):
        x = PAD_L + (W - PAD_L) * (i + 0.5) / max(1, n)
        out.append(f'<text x="{x:.1f}" y="{H - 6}" text-anchor="middle">{escape(labels[i])}</text>')
    return "".join(out)


def _legend(series: Sequence[tuple[str, str, Any]]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{c}"></i>{escape(name)}</span>' for name, c, _ in series) + "</div>"


def line_chart(chart_id: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float | None]]],
               unit: str = "") -> str:
    """Lines with a dot per point that has data; a minute without calls is a gap, not a zero."""
    values = [v for _, _, vs in series for v in vs if v is not None]
    top = _nice_max(max(values, default=0.0))
    n = max(1, len(labels))
    body = [_axis(labels, top, unit)]
    for name, color, vs in series:
        points = []
        for i, v in enumerate(vs):
            if v is None:
                continue
            x = PAD_L + (W - PAD_L) * (i + 0.5) / n
            y = PAD_T + (H - PAD_T - PAD_B) * (1 - v / top)
            points.append((x, y, v))
        if len(points) > 1:
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                        + " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points) + '"/>')
        body += [f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}">'
                 f'<title>{escape(name)}: {v:.4g}</title></circle>' for x, y, v in points]
    empty = "" if values else f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="muted">no calls</text>'
    return (f'<svg id="{chart_id}" viewBox="0 0 {W} {H}" role="img">{"".join(body)}{empty}</svg>'
            + _legend(series))


def bar_chart(chart_id: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]]) -> str:
    """Stacked bars, one per label."""
    n = max(1, len(labels))
    totals = [sum(vs[i] for _, _, vs in series) for i in range(len(labels))]
    top = _nice_max(max(totals, default=0.0))
    body = [_axis(labels, top, "$")]
    width = (W - PAD_L) / n * 0.8
    for i in range(len(labels)):
        base = 0.0
        x = PAD_L + (W - PAD_L) * i / n + (W - PAD_L) / n * 0.1
        for name, color, vs in series:
            v = vs[i]
            if v <= 0:
                continue
            y0 = PAD_T + (H - PAD_T - PAD_B) * (1 - base / top)
            y1 = PAD_T + (H - PAD_T - PAD_B) * (1 - (base + v) / top)
            body.append(f'<rect class="spend-bar" x="{x:.1f}" y="{y1:.1f}" width="{width:.1f}" height="{y0 - y1:.1f}" '
                        f'fill="{color}"><title>{escape(labels[i])} {escape(name)}: ${v:.6f}</title></rect>')
            base += v
    empty = "" if any(totals) else f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="muted">no spend</text>'
    return (f'<svg id="{chart_id}" viewBox="0 0 {W} {H}" role="img">{"".join(body)}{empty}</svg>'
            + _legend(series))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>flask-claude: {title}</title><link rel="icon" href="data:,">
<style>
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827; background: #f3f4f6; }
body { margin: 0; padding: 16px 24px; }
header { display: flex; align-items: baseline; gap: 16px; margin-bottom: 12px; }
header h1 { font-size: 20px; margin: 0; } header .muted { font-size: 13px; }
.banner { padding: 8px 12px; border-radius: 6px; margin-bottom: 10px; background: #e5e7eb; font-size: 14px; }
.banner.ok { background: #dcfce7; color: #166534; } .banner.bad { background: #fee2e2; color: #991b1b; }
.banner ul { margin: 4px 0 0 18px; padding: 0; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 10px; margin-bottom: 12px; }
.tile { background: #fff; border-radius: 8px; padding: 10px 12px; box-shadow: 0 1px 2px #0001; }
.tile .k { font-size: 12px; color: #6b7280; } .tile .v { font-size: 22px; font-weight: 600; }
.tile .s { font-size: 11px; color: #9ca3af; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 12px; }
.card { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 2px #0001; }
.card.wide { grid-column: span 2; } @media (max-width: 900px) { .card.wide { grid-column: span 1; } }
.card h2 { font-size: 14px; margin: 0 0 8px; color: #374151; } .card p { font-size: 13px; margin: 6px 0; }
svg { width: 100%; height: auto; font-size: 10px; fill: #6b7280; }
svg .grid { stroke: #e5e7eb; } svg .muted { fill: #9ca3af; font-size: 13px; }
.legend { font-size: 12px; color: #4b5563; display: flex; gap: 12px; flex-wrap: wrap; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
td, th { text-align: left; padding: 3px 6px; border-bottom: 1px solid #f3f4f6; }
th { color: #6b7280; font-weight: 500; }
.ok { color: #15803d; } .bad { color: #b91c1c; font-weight: 600; } .muted { color: #9ca3af; }
.budget { margin-bottom: 8px; font-size: 13px; } .budget .row { display: flex; justify-content: space-between; }
.bar { position: relative; height: 8px; background: #e5e7eb; border-radius: 4px; overflow: hidden; margin-top: 3px; }
.bar .fill { position: absolute; left: 0; top: 0; bottom: 0; background: #2563eb; }
.bar .fill.bad { background: #dc2626; }
.bar .held { position: absolute; right: 0; top: 0; bottom: 0; background: #93c5fd; }
</style></head>
<body><header><h1>flask-claude &middot; {title}</h1>
<span class="muted" id="updated">shared rollups; refreshes every few seconds</span></header>
<main id="content">{content}</main>
<script>
(function () {
  var main = document.getElementById("content"), stamp = document.getElementById("updated");
  function refresh() {
    fetch(location.pathname + "?fragment=1", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
      .then(function (html) {
        main.innerHTML = html;
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) { stamp.textContent = "refresh failed (" + e.message + "), retrying"; });
  }
  window.claudeDashboardRefresh = refresh;
  setInterval(refresh, {refresh});
})();
</script></body></html>
"""
