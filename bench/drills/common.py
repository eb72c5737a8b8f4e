"""What every drill shares: a result row (figure, goal, pass/fail) and RELIABILITY.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Finding:
    """One measured figure of a drill against its goal."""

    drill: str
    figure: str  # what was measured, with its value
    goal: str
    passed: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        return f"| {self.drill} | {self.figure} | {self.goal} | {'pass' if self.passed else '**FAIL**'} |"


def write_report(findings: list[Finding], path: str, command: str, seconds: dict[str, float]) -> str:
    lines = [
        "# Reliability drills",
        "",
        f"Written by `{command}` on {dt.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} cores, "
        "no GPU). Each drill breaks something on purpose and measures what users would see; the goals come "
        "from issue 8. Figures are from this one run.",
        "",
        "| drill | figure | goal | result |",
        "| --- | --- | --- | --- |",
        *[f.row() for f in findings],
        "",
        "Time per drill group: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".",
        "",
    ]
    failed = [f for f in findings if not f.passed]
    lines.append(f"**{len(findings) - len(failed)} of {len(findings)} figures meet their goal.**")
    details = {f"{f.drill}: {f.figure}": f.detail for f in findings if f.detail}
    if details:
        lines += ["", "## Details", "", "```json", json.dumps(details, indent=1, default=str), "```"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def as_dict(findings: list[Finding]) -> list[dict[str, Any]]:
    return [asdict(f) for f in findings]
