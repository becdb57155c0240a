"""``python -m flask_claude.simulator [options]``: an alias of ``flask claude simulate`` for when
there is no Flask app at hand; the options and their handling live in that command alone."""

from __future__ import annotations

from collections.abc import Sequence

from ..cli import simulate


def main(argv: Sequence[str] | None = None) -> int:
    simulate.main(args=list(argv) if argv is not None else None, prog_name="python -m flask_claude.simulator")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
