"""The fuzz drill's reading of schemathesis's ndjson event log, without a server."""

from __future__ import annotations

import json

from bench.drills.hostile import _fuzz_statuses


def _scenario(cases: dict[str, tuple[str, str, int | None]]) -> dict:
    """A ScenarioFinished event as schemathesis 4 writes it: its cases and their interactions."""
    return {"ScenarioFinished": {"phase": "fuzzing", "recorder": {
        "label": "POST /v1/completions",
        "cases": {cid: {"value": {"method": m, "path": p, "id": cid}} for cid, (m, p, _) in cases.items()},
        "interactions": {cid: {"request": {"method": m}, "response": None if st is None else {"status_code": st}}
                         for cid, (m, p, st) in cases.items()}}}}


def test_every_response_is_read_with_its_route_and_a_request_without_one_is_not_counted(tmp_path):
    report = tmp_path / "report.ndjson"
    events = [{"Initialize": {"seed": 0}},
              _scenario({"a": ("POST", "/v1/completions", 200), "b": ("POST", "/v1/completions", 500)}),
              _scenario({"c": ("GET", "/healthz", 200), "d": ("POST", "/v1/tag", None)}),  # d: no response
              {"ScenarioStarted": {"recorder": {"label": "x"}}}]
    report.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert _fuzz_statuses(str(report)) == [("POST", "/v1/completions", 200), ("POST", "/v1/completions", 500),
                                           ("GET", "/healthz", 200)]
    assert _fuzz_statuses(str(tmp_path / "missing.ndjson")) == []
