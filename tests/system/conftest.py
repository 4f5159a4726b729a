"""Fixtures for the tests that prove the .deb and its unit under a real systemd.

- `sandbox_harness`: tests/system/sandbox.py (loaded by path: tests run with
  `--import-mode=importlib`, so it is reached through this fixture);
- `deb`: the built package, dist/tickguard_<version>_<arch>.deb
  (packaging/build-deb.sh builds it);
- `installed`: one sandbox per test module (systemd as PID 1 of throw-away
  namespaces, loopback-only network) with the package installed by `dpkg -i`.

Where the sandbox cannot run (not root, unshare or overlayfs not permitted,
no systemd) or the package is not built, these tests skip and say why. With
TICKGUARD_SYSTEM_TESTS=require in the environment (CI), they fail instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "TICKGUARD_SYSTEM_TESTS"
# What the package is built from: a .deb older than any of these is stale.
DEB_INPUTS = (
    "daemon",
    "systemd",
    "packaging",
    "grafana",
    "pyproject.toml",
    "requirements.lock",
    "README.md",
)


def unavailable(reason: str) -> NoReturn:
    """Skip with `reason`, or fail when the environment requires these tests to run."""
    if os.environ.get(REQUIRE_ENV) == "require":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=require)", pytrace=False)
    pytest.skip(reason)


def _newest_input() -> tuple[float, Path]:
    newest = (0.0, ROOT)
    for name in DEB_INPUTS:
        top = ROOT / name
        paths = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        for p in paths:
            if "__pycache__" not in p.parts:
                newest = max(newest, (p.stat().st_mtime, p))
    return newest


@pytest.fixture(scope="session")
def sandbox_harness() -> ModuleType:
    """The harness module, tests/system/sandbox.py."""
    name = "tickguard_system_sandbox"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("sandbox.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package under test; skips when it is not built or older than its sources."""
    if shutil.which("dpkg") is None:
        unavailable("not a Debian system (no dpkg): the .deb cannot be tested here")
    with open(ROOT / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = ROOT / "dist" / f"tickguard_{version}_{arch}.deb"
    if not path.is_file():
        unavailable(f"{path.relative_to(ROOT)} not built: run packaging/build-deb.sh")
    mtime, newest = _newest_input()
    if path.stat().st_mtime < mtime:
        unavailable(
            f"{path.relative_to(ROOT)} is older than {newest.relative_to(ROOT)}:"
            " rebuild it with packaging/build-deb.sh"
        )
    return path


@pytest.fixture(scope="module")
def installed(sandbox_harness: ModuleType, deb: Path) -> Iterator[Any]:
    """A booted systemd sandbox with the package installed (fresh per test module)."""
    reason = sandbox_harness.unavailable_reason()
    if reason:
        unavailable(reason)
    with sandbox_harness.Sandbox() as box:
        shutil.copy(deb, box.share / deb.name)
        box.run("dpkg", "-i", str(box.share / deb.name))
        yield box
