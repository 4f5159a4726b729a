"""Static checks of the Grafana dashboard, the provisioning files and the alert rules.

The dashboard: valid JSON, unique panel ids, the `datasource` variable on every
query, a unit on every panel, every PromQL expression parsed by promtool and
every metric it names exported by the daemon's own registry. The alert rules:
`promtool check rules`, one `promtool test rules` file per alert (firing,
healthy, outside market hours), labels, annotations and runbook links.

promtool comes from Debian's `prometheus` package (scripts/install-prometheus.sh
puts it in .cache/prometheus/bin); without it the promtool tests skip.

PyYAML is not a dependency: the YAML files here are ours and read with a few
targeted patterns; promtool and Prometheus parse them for real.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tickguard.app import build
from tickguard.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tickguard.json"
RULES = GRAFANA / "alerts" / "tickguard.rules.yml"
RULE_TESTS = sorted((GRAFANA / "alerts" / "tests").glob("*.yml"))
RUNBOOK = GRAFANA / "RUNBOOK.md"
PROMTOOL_TIMEOUT = 60.0  # seconds for one promtool run

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables, replaced by values Prometheus accepts before parsing.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
}
ALERTS = {  # issues 5 (and one more), 11 and 14, and SPEC 9's leadership, with their severity
    "TickguardDown": "critical",
    "TickguardFeedDisconnected": "warning",
    "TickguardPricesStale": "critical",
    "TickguardPositionsUnguarded": "critical",
    "TickguardReconnectStorm": "warning",
    "TickguardDnsFallbackInUse": "warning",
    "TickguardFallbackExit": "warning",
    "TickguardExitFailed": "critical",
    "TickguardWatchdogStalled": "critical",
    "TickguardEventLoopLag": "warning",
    "TickguardRestarting": "warning",
    "TickguardBrokerPositionsUnguarded": "critical",
    "TickguardReconcileStale": "warning",
    "TickguardSafetyNetUncovered": "warning",
    "TickguardNoLeader": "critical",
    "TickguardMultipleLeaders": "critical",
}
MARKET_HOURS_ONLY = {
    "TickguardFeedDisconnected",
    "TickguardPricesStale",
    "TickguardPositionsUnguarded",
    "TickguardReconnectStorm",
    "TickguardDnsFallbackInUse",
    "TickguardBrokerPositionsUnguarded",
    "TickguardReconcileStale",
    "TickguardSafetyNetUncovered",
}
TOP_ROW = [
    "Feed connected",
    "Fallback active",
    "Max price age",
    "Stale symbols",
    "Open positions",
    "Market open",
]

# PromQL words that are not metric names: operators, modifiers, functions, aggregations.
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "inf", "nan",
}  # fmt: skip


# ---------------------------------------------------------------------------
# Helpers


def promtool() -> str:
    """The promtool binary, or skip the test."""
    local = ROOT / ".cache" / "prometheus" / "bin" / "promtool"
    if local.is_file():
        return str(local)
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not found: run scripts/install-prometheus.sh")
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        cwd=cwd,
        check=False,
    )


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every annotation query."""
    for panel in all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]
    for annotation in dash["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (after `substitute`)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group()
        before = e[: m.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # part of a number (1e3) or a duration
        if e[m.end() :].lstrip().startswith("(") or e[m.end() :].lstrip().startswith(
            ("by", "without")
        ):
            continue  # a function or an aggregation
        if word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


async def exported_metric_names(state_dir: Path) -> set[str]:
    """Every series name the daemon's registry exports (built from a real config)."""
    config = parse_config(
        {
            "daemon": {"state_dir": str(state_dir)},
            "http": {"listen": "127.0.0.1:0"},
            "feed": {"url": "ws://127.0.0.1:9/ws"},
            "dns": {"fallback_servers": []},
            "market": {"always_open": True},
        },
        env={},
    )
    daemon = await build(config)
    try:
        names: set[str] = set()
        for family in daemon.metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
            if family.type == "gauge":  # e.g. per-symbol ages: no samples without positions
                names.add(family.name)
        return names
    finally:
        await daemon.session.close()
        daemon.store.close()


def rule_blocks() -> dict[str, str]:
    """Alert name -> its block of text in the rules file."""
    text = RULES.read_text(encoding="utf-8")
    parts = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    blocks = {}
    for part in parts:
        name, _, body = part.partition("\n")
        blocks[name.strip()] = body
    return blocks


def rule_expr(block: str) -> str:
    """The expr of one rule block (a plain or a folded `>-` scalar)."""
    m = re.search(r"^(\s*)expr: (.*)$", block, re.MULTILINE)
    assert m is not None, block
    indent, first = m.group(1), m.group(2)
    if first.strip() not in (">-", ">", "|", "|-"):
        return first.strip()
    lines = []
    for line in block[m.end() + 1 :].splitlines():
        if line.strip() and len(line) - len(line.lstrip()) <= len(indent):
            break
        lines.append(line.strip())
    return " ".join(x for x in lines if x)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown document."""
    out = set()
    for m in re.finditer(r"^#+ (.+)$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


# ---------------------------------------------------------------------------
# The dashboard


def test_dashboard_is_valid_json_with_unique_panel_ids() -> None:
    """The dashboard parses, every panel id is unique, and it has no `__inputs` import section."""
    dash = dashboard()
    assert "__inputs" not in dash and "${DS_" not in DASHBOARD.read_text(encoding="utf-8")
    assert dash["uid"] == "tickguard" and dash["title"]
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_dashboard_layout_fits_and_starts_with_the_status_row() -> None:
    """Panels stay in the 24-column grid without overlapping; the top row is the six status stats."""
    panels = list(all_panels(dashboard()["panels"]))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    top = sorted((p for p in panels if p["gridPos"]["y"] == 0), key=lambda p: p["gridPos"]["x"])
    assert [p["title"] for p in top] == TOP_ROW
    assert all(p["type"] == "stat" for p in top)


def test_dashboard_uses_the_datasource_variable_everywhere() -> None:
    """A `datasource` template variable exists and every panel, target, annotation and query variable uses it."""
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, v["name"]
    checked = 0
    for panel in all_panels(dash["panels"]):
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])
            checked += 1
    for annotation in dash["annotations"]["list"]:
        if annotation.get("builtIn"):
            continue
        assert annotation["datasource"] == DATASOURCE, annotation["name"]
    assert checked >= 20


def test_every_panel_has_a_unit() -> None:
    """Every non-row panel sets a unit on its fields."""
    for panel in all_panels(dashboard()["panels"]):
        if panel["type"] != "row":
            unit = panel["fieldConfig"]["defaults"].get("unit")
            assert isinstance(unit, str) and unit, f"{panel['title']!r} has no unit"


def test_every_dashboard_query_filters_on_the_instance_variable() -> None:
    """Every metric selector in the dashboard is scoped to the `$instance` variable."""
    for where, expr in queries(dashboard()):
        for name in metric_names(substitute(expr)):
            for m in re.finditer(rf"\b{name}\b(\{{[^}}]*\}})?", expr):
                assert m.group(1) and 'instance=~"$instance"' in m.group(1), (where, expr)


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules) once Grafana's variables are filled in."""
    exprs = list(queries(dashboard()))
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (where, expr) in enumerate(exprs):
        lines += [f"      # {where}", f"      - record: dashboard:query_{n}"]
        lines.append(f"        expr: {json.dumps(substitute(expr))}")
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = run_promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    # The check can fail: a broken expression is reported.
    rules.write_text(
        lines[0]
        + "\n"
        + "\n".join(lines[1:3])
        + '\n      - record: x\n        expr: "sum(rate(x[1m])"\n'
    )
    assert run_promtool("check", "rules", str(rules)).returncode != 0


async def test_dashboard_metrics_are_exported_by_the_daemon(tmp_path: Path) -> None:
    """Every metric name a dashboard query selects is exported by the daemon's registry."""
    assert metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y"}[1m]))) > on(job) group_left() b and c == 1e3'
    ) == {"a_bucket", "b", "c"}  # the extractor itself
    exported = await exported_metric_names(tmp_path / "state")
    used: set[str] = set()
    for where, expr in queries(dashboard()):
        names = metric_names(substitute(expr))
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: not exported: {sorted(names - exported)}"
        used |= names
    # The panels: every SPEC metric but the build info and bad frames is on it.
    spec = {
        "tickguard_websocket_connected", "tickguard_websocket_reconnect_attempts_total",
        "tickguard_websocket_network_errors_total", "tickguard_ticks_total",
        "tickguard_dns_lookups_total", "tickguard_dns_fallbacks_total",
        "tickguard_price_age_seconds", "tickguard_price_age_max_seconds",
        "tickguard_stale_symbols", "tickguard_fallback_active", "tickguard_exits_total",
        "tickguard_exit_failures_total", "tickguard_order_seconds_bucket",
        "tickguard_open_positions", "tickguard_market_open", "tickguard_watchdog_pings_total",
        "tickguard_event_loop_lag_seconds",
        # SPEC 8, the account
        "tickguard_unguarded_positions", "tickguard_external_closes_total",
        "tickguard_exit_quantity_clamped_total", "tickguard_reconcile_failures_total",
        "tickguard_reconcile_last_success_timestamp_seconds",
        # SPEC 10, the broker-held safety net (and its enabled gauge)
        "tickguard_safety_net_positions", "tickguard_safety_net_failures_total",
        "tickguard_safety_net_enabled",
        # SPEC 9, high availability
        "tickguard_leader", "tickguard_leader_changes_total",
    }  # fmt: skip
    assert spec <= used, sorted(spec - used)


def test_provisioning_files_are_grafana_shaped() -> None:
    """The dashboards provider reads JSON files from an absolute path; the example data source is Prometheus."""
    provider = (GRAFANA / "provisioning" / "dashboards" / "tickguard.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", provider, re.MULTILINE)
    assert re.search(r"^providers:$", provider, re.MULTILINE)
    assert re.search(r"^\s+type: file$", provider, re.MULTILINE)
    path = re.search(r"^\s+path: (\S+)$", provider, re.MULTILINE)
    assert path is not None and path.group(1).startswith("/"), provider
    assert DASHBOARD.name in provider  # the comment says where the JSON goes
    source = (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", source, re.MULTILINE)
    assert re.search(r"^datasources:$", source, re.MULTILINE)
    assert re.search(r"^\s+type: prometheus$", source, re.MULTILINE)
    # Never the default: provisioning two defaults in one organisation is an error.
    assert re.search(r"^\s+isDefault: false$", source, re.MULTILINE)
    assert "__inputs" not in provider + source


# ---------------------------------------------------------------------------
# The alert rules


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the rules file and finds every alert."""
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.stem for p in RULE_TESTS])
def test_promtool_test_rules(test_file: Path) -> None:
    """`promtool test rules` passes for this alert's unit tests (firing, healthy, market closed)."""
    result = run_promtool("test", "rules", test_file.name, cwd=test_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    """Each alert has a promtool test where it fires and one where it stays silent."""
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        text = path.read_text(encoding="utf-8")
        assert re.search(r"^  - \.\./tickguard\.rules\.yml$", text, re.MULTILINE), path.name
        for m in re.finditer(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text):
            (silent if m.group(2) else firing).add(m.group(1))
    assert set(rule_blocks()) == set(ALERTS)
    assert firing == set(ALERTS), sorted(set(ALERTS) - firing)
    assert silent == set(ALERTS), sorted(set(ALERTS) - silent)
    # Market-hours alerts have a test with tickguard_market_open at 0 throughout.
    for name in MARKET_HOURS_ONLY:
        closed = [
            p
            for p in RULE_TESTS
            if f"alertname: {name}" in (t := p.read_text())
            and re.search(r"tickguard_market_open\{[^}]*\}'\n\s+values: '0x\d+'", t)
        ]
        assert closed, f"{name}: no test outside market hours"


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    """Every alert has its severity, a summary and description with the value, and a runbook_url to its RUNBOOK.md section."""
    runbook = RUNBOOK.read_text(encoding="utf-8")
    sections = anchors(runbook)
    assert "tickguard close SYMBOL" in runbook
    for name, block in rule_blocks().items():
        assert re.search(rf"^\s+severity: {ALERTS[name]}$", block, re.MULTILINE), name
        assert re.search(r"^\s+summary: ", block, re.MULTILINE), name
        description = block.split("description:", 1)[1].split("runbook_url:", 1)[0]
        assert "$value" in description, f"{name}: the description does not carry the value"
        expr = rule_expr(block)
        if "tickguard_price_age_seconds" in expr:
            assert "$labels.symbol" in description, f"{name}: the description lacks the symbol"
        if name in MARKET_HOURS_ONLY:
            assert "and on(job, instance) tickguard_market_open == 1" in expr, name
        else:
            assert "tickguard_market_open" not in expr, name
        url = re.search(r"^\s+runbook_url: (\S+)$", block, re.MULTILINE)
        assert url is not None, name
        assert url.group(1).endswith(f"/grafana/RUNBOOK.md#{name.lower()}"), url.group(1)
        assert name.lower() in sections, f"RUNBOOK.md has no section for {name}"
        assert f"## {name}\n" in runbook


async def test_rule_metrics_are_exported_by_the_daemon(tmp_path: Path) -> None:
    """Every metric an alert expression selects is exported by the daemon (or is Prometheus's `up`)."""
    exported = await exported_metric_names(tmp_path / "state") | {"up"}
    for name, block in rule_blocks().items():
        names = metric_names(rule_expr(block))
        assert names, name
        assert names <= exported, f"{name}: not exported: {sorted(names - exported)}"
