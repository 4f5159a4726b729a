"""The README's first command: `tickguard demo` runs the whole story and exits 0."""

from __future__ import annotations

import subprocess
import sys


def test_demo_shows_the_outage_and_both_fallback_exits() -> None:
    """A short demo registers positions, fires a stop on a poll price and one on a cached price."""
    done = subprocess.run(
        [sys.executable, "-m", "tickguard", "demo", "--duration", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
    assert out.count("registered ") == 4, out
    assert "[FEED] connected" in out
    assert "the feed goes silent" in out and "black hole" in out
    assert "[SL] BOSCHLTD" in out and "(FALLBACK) via poll" in out
    assert "[EXIT] RELIANCE" in out and "(stop_loss, cache)" in out
    assert "BOSCHLTD  stop_loss     on a poll  price -> filled" in out
    assert "RELIANCE  stop_loss     on a cache price -> filled" in out
    assert "/metrics" in out and "connection-health" in out and "reconnects" in out
    assert out.rstrip().endswith("demo finished; the temporary state was removed")
