"""``flask claude report``: spend, latency and token use, aggregated from the JSON log in one pass.

The log is the only record that outlives every worker and every Redis flush, so the report reads
the file and nothing else. It streams: one line is parsed, folded into counters and dropped, so a
log of millions of lines needs memory for the counters, not for the records.

Choices that matter at 3 AM:

* Latency percentiles are exact. Each group keeps its latencies in a compact ``array('d')``
  (8 bytes a call; 8 MB per million calls and per grouping) and sorts it once at the end, one group
  at a time, so the transient peak is one sorted copy of the largest group. A sketch (t-digest,
  reservoir) would be smaller but makes "the p99 in the report is not the p99" a question nobody
  should have to ask during an incident.
* Money is summed in integer nano-dollars: ``cost_usd`` is written rounded to 8 decimals, so the
  integer sum is exact and a million additions do not drift; tests compare totals exactly.
* A line that is not a JSON object with an ``event`` (a truncated write, a stray ``print``, a line
  from another logger) is counted and skipped, never fatal: a report that dies on line 812,331 is
  no report.

The package: ``builder`` reads the lines (``--since``, tolerant number parsing, the streaming
aggregator), ``results`` holds what it found (``Report``, ``Stats``...), ``text`` renders one screen.
"""

from .builder import GROUPINGS, ReportBuilder, build_report, parse_since
from .results import Latency, Report, Spender, Stats
from .text import render_text

__all__ = [
    "GROUPINGS",
    "Latency",
    "Report",
    "ReportBuilder",
    "Spender",
    "Stats",
    "build_report",
    "parse_since",
    "render_text",
]
