"""deploy/grafana/cao-gateway.json: it imports, and it only queries series the gateway exports."""

import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

import common.metrics
from orchestration.metrics_view import SharedStateCollector

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "cao-gateway.json"


def dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(board):
    """Every panel, including those folded inside collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exprs(board):
    return [target["expr"] for panel in all_panels(board) for target in panel.get("targets", [])]


def sample_names(families):
    """The series names Prometheus sees for these metric families."""
    names = set()
    for family in families:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def exported_names():
    """Series of common.metrics' counters and histograms, plus the gauges read at scrape time."""
    families = [
        family
        for value in vars(common.metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    ]
    families += list(SharedStateCollector().collect())
    return sample_names(families)


def test_dashboard_parses_and_is_identified():
    board = dashboard()

    assert board["uid"] == "cao-gateway"
    assert board["title"] == "CAO Gateway"
    assert board["panels"]


def test_every_panel_has_a_unique_id_a_title_and_a_query():
    panels = list(all_panels(dashboard()))

    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        assert panel.get("title"), panel["id"]
        if panel["type"] == "row":
            continue
        assert panel.get("description"), panel["title"]
        assert any(target.get("expr") for target in panel.get("targets", [])), panel["title"]


def test_panels_fit_the_grid_without_overlapping():
    taken = {}
    for panel in all_panels(dashboard()):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_queries_use_only_series_the_gateway_exports(db):
    exported = exported_names()
    # The check is only as good as the names it compares with.
    assert {"cao_jobs_created_total", "cao_step_duration_seconds_bucket", "cao_queue_depth"} <= exported

    used = {name for expr in exprs(dashboard()) for name in re.findall(r"\bcao_[a-z_]+", expr)}

    assert used, "no cao_ series in any query"
    assert used <= exported, f"not exported by the gateway: {sorted(used - exported)}"


def test_every_variable_used_is_defined():
    board = dashboard()
    defined = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "service", "feature"} <= defined

    # $name and ${name} anywhere (queries, data sources, variable queries); $__ are Grafana's own.
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(board)))
    used = {name for name in used if not name.startswith("__")}

    assert used <= defined, f"undefined variables: {sorted(used - defined)}"
    for expr in exprs(board):
        if "service=" in expr.replace(" ", ""):
            assert 'service=~"$service"' in expr, expr
        if "feature=" in expr.replace(" ", ""):
            assert 'feature=~"$feature"' in expr, expr
