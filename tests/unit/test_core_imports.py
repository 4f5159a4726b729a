"""tickguard.core imports only the standard library minus I/O, clocks and randomness (STYLE.md)."""

import ast
import sys
from pathlib import Path

import pytest

import tickguard.core

CORE = Path(tickguard.core.__file__).parent
CORE_PACKAGE = "tickguard.core"

# Standard-library modules that do I/O, read clocks, draw randomness or run concurrently.
FORBIDDEN = frozenset(
    {
        "asyncio", "socket", "time", "random", "os", "threading", "subprocess", "sqlite3",
        "ssl", "selectors", "logging", "zoneinfo", "http", "urllib", "signal",
        "multiprocessing", "concurrent", "io", "pathlib", "shutil", "tempfile", "importlib",
    }
)  # fmt: skip
# Clock reads through an allowed module: `datetime.now()` and friends.
CLOCK_READS = frozenset({"now", "utcnow", "today"})


def imported_modules(tree: ast.AST, package: str) -> list[str]:
    """Every module an import statement anywhere in `tree` names, relative ones resolved."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                found.append(f"{base}.{node.module}" if node.module else base)
            else:
                found.append(node.module or "")
    return found


def violations(source: str, package: str = CORE_PACKAGE) -> list[str]:
    """What in `source`, a module of `package`, breaks the core's import rules."""
    tree = ast.parse(source)
    bad: list[str] = []
    for module in imported_modules(tree, package):
        top = module.partition(".")[0]
        in_core = module == CORE_PACKAGE or module.startswith(CORE_PACKAGE + ".")
        if top in FORBIDDEN or not (in_core or top in sys.stdlib_module_names):
            bad.append(f"import {module}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in CLOCK_READS
            and isinstance(node.value, ast.Name)
            and node.value.id in {"datetime", "date"}
        ):
            bad.append(f"{node.value.id}.{node.attr}")
    return bad


def core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_core_has_the_modules_it_should() -> None:
    """The scan below sees the core's files, so an empty walk cannot pass silently."""
    names = {path.name for path in core_modules()}
    assert {"__init__.py", "backoff.py", "market.py"} <= names


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_imports_only_pure_stdlib(path: Path) -> None:
    """A core module imports only pure standard-library modules and tickguard.core."""
    package = ".".join(("tickguard", *path.relative_to(CORE.parent).parent.parts))
    assert violations(path.read_text(encoding="utf-8"), package) == []


def test_a_violation_is_caught_wherever_it_hides() -> None:
    """Imports inside functions, TYPE_CHECKING blocks, relative or third-party ones are caught."""
    source = """
from typing import TYPE_CHECKING
import os.path
from http import client
import websockets
from .. import errors
from ..store import db
if TYPE_CHECKING:
    import random
def later():
    from asyncio import sleep
    return datetime.now(), date.today()
"""
    assert violations(source) == [
        "import os.path",
        "import http",
        "import websockets",
        "import tickguard",
        "import tickguard.store",
        "import random",
        "import asyncio",
        "datetime.now",
        "date.today",
    ]


def test_pure_imports_pass() -> None:
    """Pure stdlib modules and the core's own modules, absolute or relative, are allowed."""
    source = """
from __future__ import annotations
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from . import positions
from .prices import PriceBook
from tickguard.core.exits import Exit
stamp = datetime.combine
"""
    assert violations(source) == []
