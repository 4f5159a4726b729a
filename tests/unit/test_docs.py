"""The reference in docs/ against the code it describes: metrics, configuration, CLI, logs, routes.

Each page keeps its checked part in markdown tables (or headings) that these
tests parse; see docs/README.md for which page is checked against what.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from tickguard import cli
from tickguard.config import DEFAULTS
from tickguard.core.account import ExitRule
from tickguard.core.positions import POSITION_FIELDS, ExitReason, Trigger
from tickguard.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "daemon" / "tickguard"


# -- reading the pages ------------------------------------------------------------------


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


_CELL_BORDER = re.compile(r"(?<!\\)\|")  # a `|` that is not escaped as `\|`
_RULE = re.compile(r"\|(\s*:?-+:?\s*\|)+")


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in _CELL_BORDER.split(line.strip())[1:-1]]


def tables(text: str) -> Iterator[tuple[str, list[str], list[list[str]]]]:
    """Each markdown table of `text`: (the heading above it, its header cells, its rows)."""
    lines = text.splitlines()
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and _RULE.fullmatch(lines[i + 1].strip()):
            header = _cells(line)
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            yield heading, header, rows
            continue
        i += 1


def code(cell: str) -> str:
    """The first code span of a cell (`tickguard_ticks_total` of "`tickguard_ticks_total`")."""
    match = re.match(r"`([^`]+)`", cell)
    assert match is not None, f"no code span at the start of {cell!r}"
    return match.group(1)


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def sections(text: str, level: str) -> dict[str, str]:
    """The text under each heading of exactly `level` (e.g. "##"), keyed by the heading."""
    found: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        marks = line.split(" ", 1)[0]
        if set(marks) == {"#"} and len(marks) <= len(level):
            current = line[len(marks) :].strip() if marks == level else None
            if current is not None:
                found[current] = ""
            continue
        if current is not None:
            found[current] += line + "\n"
    return found


# -- metrics: docs/metrics.md against the registry --------------------------------------

EXPOSED_TYPE = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "info": "gauge (info)",
}

# Series the daemon registers besides those of `Metrics`, which a test cannot
# build without the whole daemon: the AgeCollector's three (metrics.py; app.py
# registers it with the guard's ages) and the task-crash counter (made in app.py).
# test_extra_series_are_declared_in_the_package keeps this list honest.
EXTRA_SERIES = {
    "tickguard_price_age_seconds": ("gauge", {"symbol"}),
    "tickguard_price_age_max_seconds": ("gauge", set()),
    "tickguard_stale_symbols": ("gauge", set()),
    "tickguard_task_crashes_total": ("counter", {"task"}),
}


def exposed_name(family: Metric) -> str:
    """The name Prometheus sees: client_python names counters without `_total`, infos without `_info`."""
    suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
    return family.name + suffix


def registry_series() -> dict[str, tuple[str, set[str]]]:
    """Every tickguard_* family `Metrics` builds: exposed name -> (type, label names seen)."""
    registry = CollectorRegistry()
    Metrics(registry)
    found: dict[str, tuple[str, set[str]]] = {}
    for family in registry.collect():
        if family.name.startswith("tickguard_"):
            labels = {name for s in family.samples for name in s.labels} - {"le"}
            found[exposed_name(family)] = (EXPOSED_TYPE[family.type], labels)
    return found


def documented_series() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table: name -> (type, label names)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for _, header, rows in tables(page("metrics.md")):
        if header != ["name", "type", "labels", "meaning"]:
            continue
        for name_cell, kind, labels, _ in rows:
            name = code(name_cell)
            assert name not in found, f"{name} is documented twice"
            found[name] = (kind, set(code_spans(labels)))
    return found


def test_every_series_is_documented_with_its_type_and_labels() -> None:
    """Each tickguard_* series of the registry (and the extra ones) is in docs/metrics.md,
    with its type and every label it carries."""
    documented = documented_series()
    for name, (kind, labels) in {**EXTRA_SERIES, **registry_series()}.items():
        assert name in documented, f"{name} is not in docs/metrics.md"
        doc_kind, doc_labels = documented[name]
        assert doc_kind == kind, f"{name}: documented as {doc_kind}, is a {kind}"
        assert labels <= doc_labels, f"{name}: labels {sorted(labels - doc_labels)} not documented"


def test_every_documented_series_exists() -> None:
    """Each tickguard_* name in docs/metrics.md is a series the daemon exports."""
    exported = {**EXTRA_SERIES, **registry_series()}
    for name, (_, labels) in documented_series().items():
        assert name.startswith("tickguard_"), name
        assert name in exported, f"docs/metrics.md documents {name}, which nothing exports"
        assert labels == exported[name][1] or not exported[name][1], (
            f"{name}: documented labels {sorted(labels)}, exported {sorted(exported[name][1])}"
        )


def _declared_series() -> dict[str, str]:
    """Series names given as string literals to a metric constructor anywhere in the package."""
    kinds = {
        "Counter": "counter",
        "CounterMetricFamily": "counter",
        "Gauge": "gauge",
        "GaugeMetricFamily": "gauge",
        "Histogram": "histogram",
        "Info": "info",
    }
    found: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if name in kinds and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found[first.value] = kinds[name]
    return found


def test_extra_series_are_declared_in_the_package() -> None:
    """The series listed in EXTRA_SERIES are really made somewhere in the package, with that type."""
    declared = _declared_series()
    for name, (kind, _) in EXTRA_SERIES.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert declared.get(base) == kind, f"{name}: no {kind} named {base!r} in daemon/tickguard"


# -- configuration: docs/config.md against DEFAULTS -------------------------------------


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _toml(literal: str) -> object:
    value = tomllib.loads(f"v = {literal}")["v"]
    return tuple(value) if isinstance(value, list) else value  # DEFAULTS holds lists as tuples


def documented_defaults() -> dict[str, object]:
    """docs/config.md's `key | default | meaning` tables, as dotted key -> value."""
    found: dict[str, object] = {}
    for heading, header, rows in tables(page("config.md")):
        if header != ["key", "default", "meaning"]:
            continue
        section = re.fullmatch(r"`\[([a-z_.]+)\]`", heading)
        assert section is not None, f"a defaults table under {heading!r}, not under `[table]`"
        for key_cell, default, _ in rows:
            key = f"{section.group(1)}.{code(key_cell)}"
            assert key not in found, f"{key} is documented twice"
            found[key] = _toml(code(default))
    return found


def _typed(values: Mapping[str, object]) -> dict[str, tuple[str, object]]:
    return {k: (type(v).__name__, v) for k, v in values.items()}  # 5 is not 5.0 in TOML


def test_config_page_has_every_key_with_its_default() -> None:
    """docs/config.md lists exactly the keys of tickguard.config.DEFAULTS, each with its default."""
    assert _typed(documented_defaults()) == _typed(_flatten(DEFAULTS))


def _fields(heading: str) -> list[str]:
    for found, header, rows in tables(page("config.md")):
        if found == heading and header[0] == "field":
            return [code(row[0]) for row in rows]
    raise AssertionError(f"no fields table under {heading}")


def test_config_page_has_every_position_and_rule_field() -> None:
    """The `[[positions]]` and `[[rules]]` tables name exactly the fields the parser takes."""
    assert _fields("`[[positions]]`") == list(POSITION_FIELDS)
    assert _fields("`[[rules]]`") == [f.name for f in dataclasses.fields(ExitRule)]


# -- the command line: docs/cli.md against the argument parser --------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public way to list its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


def _in_code(text: str, word: str) -> bool:
    """Whether `word` appears, as a whole word, inside some code span of `text`."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")
    return any(pattern.search(span) for span in code_spans(text))


def test_cli_page_documents_every_command_and_option() -> None:
    """Each subcommand has its `## tickguard NAME` section naming every option, argument and choice."""
    parser = cli.build_parser()
    text = page("cli.md")
    documented = {
        title.strip("`").removeprefix("tickguard "): body
        for title, body in sections(text, "##").items()
        if title.startswith("`tickguard ")
    }
    commands = _subcommands(parser)
    assert set(documented) == set(commands)
    for name, sub in commands.items():
        body = documented[name]
        assert _in_code(text, f"tickguard {name}"), f"{name} is not in the commands table"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            words = [o for o in action.option_strings if o.startswith("--")]
            if not action.option_strings:
                words = [str(action.metavar or action.dest)]
            words += [str(c) for c in action.choices or ()]
            for word in words:
                assert _in_code(body, word), f"tickguard {name}: {word} is not in its section"
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert _in_code(text, f"tickguard {option}"), (
                    f"tickguard {option} is not documented"
                )


# -- log lines: docs/logs.md against the log calls --------------------------------------

LOG_METHODS = frozenset({"debug", "info", "warning", "error", "critical", "exception", "log"})
PREFIX = re.compile(r"\[([A-Z]+(?: [A-Z]+)*|%s)\] ")
# The prefixes of the external contract: they never change.
FIXED = ("DNS", "RECONNECT", "FALLBACK", "SL", "TP", "TRAIL", "BLIND", "EXIT", "ACCOUNT", "HA")
# `[%s]` is a trigger's tag (guard_loop): the exit reasons `check_triggers` decides.
TRIGGER_TAGS = {
    Trigger(reason, 1.0, 1.0).log_tag
    for reason in (ExitReason.STOP_LOSS, ExitReason.TAKE_PROFIT, ExitReason.TRAILING_STOP)
}


def _leading_text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _leading_text(node.values[0])
    return None


def logged_prefixes() -> dict[str, str]:
    """Each `[PREFIX]` a message starts with, in a logging call or a filter rewriting
    `record.msg`, anywhere in the package: prefix -> where (its first use)."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            message: ast.expr | None = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                args = node.args[1:] if node.func.attr == "log" else node.args
                if node.func.attr in LOG_METHODS and args:
                    message = args[0]
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "msg" for t in node.targets
            ):
                message = node.value
            if message is None:
                continue
            match = PREFIX.match(_leading_text(message) or "")
            if match is None:
                continue
            tags = TRIGGER_TAGS if match.group(1) == "%s" else {match.group(1)}
            for tag in tags:
                found.setdefault(tag, f"{path.relative_to(ROOT)}:{message.lineno}")
    return found


def documented_prefixes() -> dict[str, bool]:
    """docs/logs.md's prefix table: prefix -> fixed."""
    for _, header, rows in tables(page("logs.md")):
        if header[:2] == ["prefix", "fixed"]:
            return {code(row[0]).strip("[]"): row[1] == "yes" for row in rows}
    raise AssertionError("docs/logs.md has no prefix | fixed table")


def test_every_logged_prefix_is_documented() -> None:
    """Each `[PREFIX]` that a log call of the package writes is in docs/logs.md's table."""
    documented = documented_prefixes()
    missing = {tag: where for tag, where in logged_prefixes().items() if tag not in documented}
    assert not missing, f"prefixes not in docs/logs.md: {missing}"


def test_every_documented_prefix_is_logged() -> None:
    """Each prefix in docs/logs.md is written by some log call, and has its own `### ` section."""
    logged = logged_prefixes()
    lines = sections(page("logs.md"), "###")
    for tag in documented_prefixes():
        assert tag in logged, f"docs/logs.md documents [{tag}], which nothing logs"
        assert any(f"`[{tag}]`" in title for title in lines), f"no `### ` section for [{tag}]"


def test_fixed_prefixes_are_documented_as_fixed() -> None:
    """The contract's fixed prefixes are marked fixed, and nothing else is."""
    fixed = {tag for tag, is_fixed in documented_prefixes().items() if is_fixed}
    assert fixed == set(FIXED)


# -- the API: docs/api.md against openapi.json ------------------------------------------


def test_api_page_describes_every_route_of_the_openapi_document() -> None:
    """Each operation of openapi.json has a `### METHOD path` section in docs/api.md, and no more."""
    document = json.loads((PACKAGE / "openapi.json").read_text(encoding="utf-8"))
    operations = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    described = {title.strip("`") for title in sections(page("api.md"), "###")}
    assert described == operations


# -- links ------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(name: str) -> set[str]:
    return {
        _slug(line.lstrip("#").strip()) for line in page(name).splitlines() if line.startswith("#")
    }


def test_docs_links_resolve_and_the_index_lists_every_page() -> None:
    """Links between docs/ pages reach a page and a heading; docs/README.md links every page."""
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    for name in pages:
        for target, anchor in re.findall(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)", page(name)):
            assert target in pages, f"{name} links {target}, which does not exist"
            if anchor:
                assert anchor in _anchors(target), (
                    f"{name} links {target}#{anchor}: no such heading"
                )
    index = set(re.findall(r"\]\(([\w.-]+\.md)\)", page("README.md")))
    assert index == set(pages) - {"README.md"}


def test_pages_cited_by_the_code_exist() -> None:
    """Every `docs/NAME.md` a comment or docstring in the package cites is a page."""
    for path in PACKAGE.rglob("*.py"):
        for name in re.findall(r"docs/([\w-]+\.md)", path.read_text(encoding="utf-8")):
            assert (DOCS / name).is_file(), f"{path.relative_to(ROOT)} cites docs/{name}"
