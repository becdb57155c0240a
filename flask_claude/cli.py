"""``flask claude ...``: operator commands, registered on every app that runs ``init_app``.

``report`` reads the JSON log (history: what it cost, how fast, who burns tokens); ``status`` reads
the app's live storage (now: which switches are on, which breakers are open, what is left of today's
budgets). On Redis ``status`` therefore shows what every worker shares; on ``memory://`` it can only
show this CLI process's own, empty, state, and says so.

This module is the click layer only: what the commands read and print lives in ``report``,
``status`` and ``pricing``; the Batch API in ``batches``.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import click
from flask import Flask, current_app, has_app_context
from flask.cli import AppGroup

from .batches import is_batch_request
from .clock import utc_now
from .errors import ClaudeGuardError, UnknownModel
from .price_data import PRICES_INFO
from .pricing import PriceTable
from .report import GROUPINGS, build_report, parse_since, render_text
from .simulator import Simulator, run_server
from .state import state_for
from .status import collect_status, render_status, safe_uri
from .storage import StorageUnavailable

if TYPE_CHECKING:
    from .extension import ClaudeState

claude_cli = AppGroup("claude", help="flask-claude: simulator, spend report, status and prices.")


@claude_cli.command("simulate", with_appcontext=False)  # also ``python -m flask_claude.simulator``, no app
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (keep it on loopback).")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on.")
@click.option("--fail", "fail_status", type=int, default=None, metavar="STATUS",
              help="Answer this error status (e.g. 529 for an overload storm)...")
@click.option("--fail-rate", type=float, default=None, help="...to this fraction of requests (default: all).")
@click.option("--fail-model", default=None, help="...only for this model (default: every model).")
@click.option("--latency", type=float, default=0.0, help="Seconds before each response starts.")
@click.option("--pad-prompt", type=click.IntRange(min=0), default=0, metavar="TOKENS",
              help="Count this many more input tokens per request (reach a long-prompt price band).")
@click.option("--seed", type=int, default=None, help="Seed of the canned reply text (default: 0).")
@click.option("--batch-polls", type=click.IntRange(min=0), default=None,
              help="Retrieves of a message batch before it ends (default: 1).")
@click.option("--rate-limit-requests", type=click.IntRange(min=1), default=None, metavar="N",
              help="Limit each model to N requests per window (anthropic-ratelimit-* headers, 429s).")
@click.option("--rate-limit-output-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Limit each model to N output tokens per window (pre-charged at max_tokens).")
@click.option("--rate-limit-window", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds the rate limits are per (10 plays a minute six times faster).")
@click.option("--quiet", is_flag=True, help="Do not log each request.")
def simulate(host: str, port: int, fail_status: int | None, fail_rate: float | None, fail_model: str | None,
             latency: float, pad_prompt: int, seed: int | None, batch_polls: int | None,
             rate_limit_requests: int | None, rate_limit_output_tokens: int | None, rate_limit_window: float,
             quiet: bool) -> None:
    """Serve the offline Messages API; point CLAUDE_BASE_URL (or ANTHROPIC_BASE_URL) at it.

    Run in an app (``flask --app yourapp claude simulate``) that is set to simulate, it serves that
    app's simulator, so the reply rules the app sets up answer over the wire too.
    """
    state = current_app.extensions.get("claude") if has_app_context() else None
    simulator = state.simulator if state is not None and state.simulator is not None else Simulator()
    if seed is not None:
        simulator.seed = seed
    if batch_polls is not None:
        simulator.batch_polls_until_done = batch_polls
    if latency:
        simulator.latency(latency)
    if pad_prompt:
        simulator.pad_prompt(pad_prompt)
    if rate_limit_requests or rate_limit_output_tokens:
        simulator.rate_limit(requests=rate_limit_requests, output_tokens=rate_limit_output_tokens,
                             window=rate_limit_window)
    if fail_status is not None:
        simulator.fail(fail_status, rate=fail_rate, model=fail_model)
    run_server(host, port, simulator=simulator, quiet=quiet,  # --port 0: the URL has the port it picked
               ready=lambda url: click.echo(f"flask-claude simulator on {url} (CLAUDE_BASE_URL={url}); Ctrl+C to stop"))


# --- report ---------------------------------------------------------------------------------------


@claude_cli.command("report")
@click.option("--log", "log_path", default=None, metavar="PATH",
              help="The JSON log to read ('-' for stdin). Default: the app's CLAUDE_LOG_PATH.")
@click.option("--since", default="24h", show_default=True,
              help="Window start: 30m, 24h, 7d, 'today' (budget time zone), an ISO date/datetime, or 'all'.")
@click.option("--by", type=click.Choice(GROUPINGS), default="feature",
              show_default=True, help="Group spend, calls, latency and tokens by this field.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def report_command(log_path: str | None, since: str, by: str, as_json: bool) -> None:
    """Spend, latency, errors and token use from the JSON log, in one streaming pass."""
    state = state_for(required=False)
    path = log_path or (state.settings.log_path if state is not None else None)
    if not path:
        raise click.UsageError("No log file to read: this app logs to stderr (CLAUDE_LOG_PATH is not set). "
                               "Pass --log PATH, or set CLAUDE_LOG_PATH so the extension writes one.")
    tz = ZoneInfo(state.settings.budget_timezone) if state is not None else UTC
    try:
        start = parse_since(since, tz=tz, now=utc_now(state.clock) if state is not None else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--since'") from None

    if path == "-":
        result = build_report(sys.stdin.buffer, since=start, by=by, source="<stdin>")
    else:
        try:
            with open(path, "rb") as lines:  # bytes: no decode step, and bad UTF-8 is one malformed line
                result = build_report(lines, since=start, by=by, source=path)
        except FileNotFoundError:
            hint = " (from CLAUDE_LOG_PATH)" if log_path is None else ""
            raise click.ClickException(f"Log file {path!r}{hint} does not exist: no call has been logged "
                                       "there yet, or the path is wrong.") from None
        except IsADirectoryError:
            raise click.ClickException(f"{path!r} is a directory, not a log file.") from None
        except OSError as exc:
            raise click.ClickException(f"Cannot read log file {path!r}: {exc.strerror or exc}") from None
    click.echo(result.to_json() if as_json else render_text(result), nl=as_json)


# --- status ---------------------------------------------------------------------------------------


@claude_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(as_json: bool) -> None:
    """Flags, circuit breakers and today's spend, from the storage every worker shares.

    Exits 1 when the storage cannot be read, so a health check can alert on it.
    """
    state = state_for(required=False)
    if state is None:
        raise click.UsageError("flask-claude is not initialised on this app: call Claude(app) or "
                               "claude.init_app(app) in the app factory.")
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    result = collect_status(state, app)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else render_status(result))
    if not result["storage"]["ok"]:
        click.get_current_context().exit(1)


# --- check ----------------------------------------------------------------------------------------


@claude_cli.command("check")
@click.option("--strict", is_flag=True, help="Exit 2 on a warning too (a Redis that keeps nothing on disk).")
def check_command(strict: bool) -> None:
    """Is the shared storage fit for strict budgets? It answers, and it keeps its data.

    Exits 1 when the storage cannot be reached; with --strict, 2 when it keeps nothing on disk (a
    restart then loses every budget and limit).
    """
    state = state_for(required=False)
    if state is None:
        raise click.UsageError("flask-claude is not initialised on this app: call Claude(app) or "
                               "claude.init_app(app) in the app factory.")
    uri = state.settings.storage_uri
    click.echo(f"storage: {safe_uri(uri)}")
    if uri.startswith("memory://"):
        click.echo("  memory:// is one process: with several workers every limit and budget is that many times "
                   "larger. Use Redis (CLAUDE_STORAGE_URI=redis://...) when the app runs on many workers or hosts.")
        return
    store: Any = getattr(state.store, "inner", state.store)  # the Redis store behind the outage guard
    try:
        found = store.check()
    except StorageUnavailable as exc:
        click.echo(f"  reachable: no ({exc})")
        click.get_current_context().exit(1)
    click.echo("  reachable: yes")
    click.echo(f"  data-loss marker: {found['marker']}")
    eviction = found.get("eviction")
    if eviction and eviction.startswith("allkeys"):
        click.echo(f"  WARNING: maxmemory-policy {eviction} may evict budget keys under memory pressure (a budget "
                   "then forgets its spend). Use noeviction or a volatile-* policy.")
    config = found["persistence"]
    if config is None:
        click.echo("  persistence: unknown (the server refuses CONFIG GET; managed Redis services often do). "
                   "Strict budgets need a Redis that keeps its data: check its AOF or snapshot settings.")
    elif found["persists"]:
        click.echo(f"  persistence: appendonly={config.get('appendonly')} save={config.get('save')!r}")
    else:
        click.echo("  WARNING: this Redis keeps nothing on disk (appendonly=no, save=''): a restart loses every "
                   "budget, limit and alert claim. Set appendonly yes and appendfsync everysec.")
        if strict:
            click.get_current_context().exit(2)


# --- prices ---------------------------------------------------------------------------------------


def _rate_line(rates: dict[str, Any]) -> str:
    return (f"in ${rates['input']:g}  out ${rates['output']:g}  write 5m ${rates['cache_write_5m']:g}  "
            f"write 1h ${rates['cache_write_1h']:g}  read ${rates['cache_read']:g}")


def render_prices(info: dict[str, Any], entries: dict[str, dict[str, Any]]) -> str:
    out = [f"Prices in USD per million tokens; table checked {info.get('checked', '?')}. "
           "Batch calls pay half of every rate."]
    for model, entry in entries.items():
        status = entry["status"] + (f", retires {entry['retired_on']}" if entry.get("retired_on")
                                    and entry["status"] != "retired" else "")
        tag = "  [CLAUDE_PRICES override]" if entry.get("overridden") else ""
        out.append(f"{model}  ({status}){tag}")
        if entry.get("aliases"):
            out.append(f"  also: {', '.join(entry['aliases'])}")
        for period in entry["prices"]:
            since = f"from {period['from']}: " if "from" in period else ""
            lower = " (prompt up to " + f"{period['bands'][0]['above']:,} tokens)" if period.get("bands") else ""
            out.append(f"  {since}{_rate_line(period)}{lower}")
            for band in period.get("bands", ()):
                out.append(f"    prompt over {band['above']:,} tokens: {_rate_line(band)}")
        if entry.get("source"):
            out.append(f"  source: {entry['source']} (checked {entry.get('checked', '?')})")
        if len(entries) == 1 and entry.get("notes"):
            out.append(f"  notes: {entry['notes']}")
    return "\n".join(out)


@claude_cli.command("prices")
@click.option("--model", "model", default=None, metavar="MODEL",
              help="Show one model (an alias or dated id resolves to its model).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON, in the data file's shape.")
def prices_command(model: str | None, as_json: bool) -> None:
    """The price table this app bills with: packaged prices plus CLAUDE_PRICES overrides."""
    state = state_for(required=False)
    table = state.prices if state is not None else PriceTable()
    if model is not None:
        try:
            chosen = [table.entry(model)]
        except UnknownModel:
            raise click.BadParameter(f"no price for {model!r}; `flask claude prices` lists every priced model",
                                     param_hint="'--model'") from None
    else:
        chosen = table.entries()
    entries = {e.model: e.as_dict() for e in chosen}
    info = dict(PRICES_INFO)
    if as_json:
        click.echo(json.dumps({"checked": info.get("checked"), "sources": info.get("sources"),
                               "models": entries}, indent=2, ensure_ascii=False))
    else:
        click.echo(render_prices(info, entries))


# --- batches --------------------------------------------------------------------------------------

batch_cli = AppGroup("batch", help="Submit, watch and read Message Batches (half price, same budgets and logs).")
claude_cli.add_command(batch_cli)


def _batch_scope(feature: str | None) -> None:
    from flask import g

    from .context import CallScope

    g.claude_scope = CallScope(feature=feature, route="cli:batch")


def _guarded_state() -> ClaudeState:
    state = state_for(required=False)
    if state is None:
        raise click.ClickException("flask-claude is not initialised on this app")
    return state


@batch_cli.command("submit")
@click.argument("jsonl", type=click.File("r"))
@click.option("--feature", default=None, help="Attribute the batch's spend to this feature (and its budget).")
def batch_submit(jsonl: Any, feature: str | None) -> None:
    """Submit FILE.jsonl: one {"custom_id": ..., "params": {...}} per line."""
    requests = []
    for number, line in enumerate(jsonl, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"line {number} is not JSON: {exc.msg}") from None
        if not is_batch_request(item):
            raise click.ClickException(f'line {number} must be {{"custom_id": ..., "params": {{...}}}}')
        requests.append(item)
    if not requests:
        raise click.ClickException("the file has no requests")
    _batch_scope(feature)
    try:
        batch = _guarded_state().messages.batches.create(requests=requests)
    except ClaudeGuardError as exc:
        raise click.ClickException(f"{exc.reason}: {exc}") from None
    click.echo(batch.id)


@batch_cli.command("status")
@click.argument("batch_id")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Poll with a progress bar until it ends.")
@click.option("--interval", default=5.0, show_default=True, help="Seconds between polls.")
def batch_status(batch_id: str, wait: bool, interval: float) -> None:
    """Show a batch's progress; with --wait, poll until it has ended."""
    state = _guarded_state()
    batch = state.messages.batches.retrieve(batch_id)
    counts = batch.request_counts
    total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
    if wait and batch.processing_status != "ended":
        with click.progressbar(length=total, label=f"{batch_id}") as bar:
            done = total - counts.processing
            bar.update(done)
            while batch.processing_status != "ended":
                state.clock.sleep(interval)
                batch = state.messages.batches.retrieve(batch_id)
                now_done = total - batch.request_counts.processing
                bar.update(now_done - done)
                done = now_done
    counts = batch.request_counts
    click.echo(f"{batch.id}: {batch.processing_status} (succeeded {counts.succeeded}, errored {counts.errored}, "
               f"canceled {counts.canceled}, expired {counts.expired}, processing {counts.processing})")


@batch_cli.command("results")
@click.argument("batch_id")
def batch_results(batch_id: str) -> None:
    """Print each result as a JSON line with its cost at the batch rate; settle the batch's budget hold."""
    state = _guarded_state()
    total = 0.0
    record = state.messages.batches._get(batch_id) or {}
    for item in state.messages.batches.results(batch_id):
        out: dict[str, Any] = {"custom_id": item.custom_id, "type": item.result.type}
        if item.result.type == "succeeded":
            message = item.result.message
            cost = state.prices.cost(message.model, message.usage, batch=True, at=record.get("submitted_at")).usd
            total += cost
            out.update(text="".join(getattr(b, "text", "") for b in message.content),
                       stop_reason=message.stop_reason, cost_usd=round(cost, 8))
        click.echo(json.dumps(out, ensure_ascii=False))
    click.echo(f"total ${total:.6f} at the batch rate", err=True)
