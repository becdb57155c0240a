"""``flask claude ...``: operator commands, registered on every app that runs ``init_app``."""

from __future__ import annotations

import click
from flask.cli import AppGroup

claude_cli = AppGroup("claude", help="flask-claude: simulator, spend report and status.")


@claude_cli.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (keep it on loopback).")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on.")
def simulate(host: str, port: int) -> None:
    """Serve the offline Messages API; point CLAUDE_BASE_URL (or ANTHROPIC_BASE_URL) at it."""
    from .simulator import run_server

    click.echo(f"flask-claude simulator on http://{host}:{port} (CLAUDE_BASE_URL=http://{host}:{port})")
    run_server(host, port)
