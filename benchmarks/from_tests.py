"""Load a scenario that lives beside the integration tests (tests/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parents[1] / "tests" / "integration"


def load(name: str) -> ModuleType:
    """tests/integration/<name>.py as a module, by path."""
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def finish(call: object) -> None:
    """Run the guard loop's sweep to its end: a coroutine since the store has two backends
    (on SQLite it never waits, so its first step ends it), a plain call in older checkouts."""
    if isinstance(call, Coroutine):
        try:
            call.send(None)
        except StopIteration:
            return
        call.close()
        raise RuntimeError("the sweep waited")
