"""The embedded Ray that every job starts keeps its dashboard on loopback."""

from __future__ import annotations

from bench.drills.security import dashboard_loopback


def test_embedded_dashboard_listens_on_loopback_only():
    (finding,) = dashboard_loopback()
    assert finding.passed, (finding.figure, finding.detail)
