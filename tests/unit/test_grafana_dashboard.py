"""The example Grafana dashboard is valid JSON and asks only for series we export."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def exported() -> set[str]:
    """Metric names declared in the proxy's metrics and the panel's collector."""
    names = set()
    for source in ("proxy/metrics.py", "webapp/metrics.py"):
        names |= set(re.findall(r'"(outbound_guard_[a-z_]+)"', (ROOT / source).read_text()))
    return names


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_dashboard_query_names_an_exported_metric():
    dashboard = json.loads((ROOT / "deploy/grafana-outbound-guard.json").read_text())
    names = exported() | {base(n) for n in exported()}
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"outbound_guard_[a-z_]+", target["expr"])}
    assert queried, "the dashboard queries nothing"
    assert sorted(n for n in queried if n not in names and base(n) not in names) == []
