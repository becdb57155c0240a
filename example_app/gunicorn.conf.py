"""gunicorn settings for the example app: 4 worker processes sharing limits and budgets in Redis.

    REDIS_URL=redis://localhost:6379/0 gunicorn -c example_app/gunicorn.conf.py

Set ANTHROPIC_API_KEY for the real API (else every worker runs its own offline simulator) and
LAUNCHDARKLY_SDK_KEY for real LaunchDarkly (else each worker reads example_app/flags.json).
"""

import os

# Every worker must count against the same limits, budgets and circuit breakers. With memory://
# each of the 4 workers would keep its own, and users would get 4 times every limit and budget.
if not os.environ.get("REDIS_URL"):
    raise RuntimeError("example_app/gunicorn.conf.py runs 4 workers: set REDIS_URL (e.g. redis://localhost:6379/0) "
                       "so they share limits and budgets")

wsgi_app = "example_app:create_app()"
bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = 4
# Threads, because /chat streams: a sync worker would be held by one open stream.
worker_class = "gthread"
threads = 8
# Longer than CLAUDE_DEADLINE (60 s by default): the app ends a slow Claude call itself first.
timeout = 75
graceful_timeout = 75
# Build the app once in the master: a bad CLAUDE_* setting fails the start, not 4 workers.
preload_app = True


def post_fork(server, worker):
    """Runs in each worker right after the fork.

    What needs re-initialising after a fork is anything that owns threads or open connections
    created in the master. With preload_app, create_app() ran in the master, and for this app:

    * LaunchDarkly (LaunchDarklyFlags, from LAUNCHDARKLY_SDK_KEY or the flag file): not needed.
      The client is built lazily on the first flag lookup in each process, so the master never
      starts one, and a client inherited across a fork is rebuilt when the pid changes. A client
      you build yourself and hand in (CLAUDE_FLAGS=LaunchDarklyFlags(client)) gets
      client.postfork() on its first use in the worker, so that needs no hook either.
    * Redis: not needed. redis-py notices the new pid and opens its own connections, and the
      master made none.
    * The Anthropic client: not needed, as long as the master sends no request (its connection
      pool would otherwise be shared between workers). Do not warm it up at import time.
    * The JSON call log: not needed. Each process reopens the file and appends whole lines.

    What *would* need this hook: an ldclient you create at import time and use directly (not
    through flask-claude), e.g. ldclient.set_config(...) followed by ldclient.get() in the master;
    then call ldclient.get().postfork() here.
    """
    server.log.info("worker %s ready", worker.pid)
