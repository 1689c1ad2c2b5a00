"""The README's main job (scripts/demo.sh runs examples/demo.py) keeps working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_end_to_end_and_leaves_nothing() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "reached 203.0.113.10:80" in out
    assert "UNEXPECTED" not in out
    assert '"action":"deny"' in out  # the audit event of the custom firewall's denial
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cwdemo" not in names
