"""The bench's figures: one row per comparison (ours, the baseline, the ratio), printed and saved as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any



# ---- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    suite: str
    metric: str
    ours: float | None
    baseline: float | None = None
    baseline_name: str = ""
    unit: str = ""
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None:
            return None
        if self.higher_is_better:
            return self.ours / self.baseline if self.baseline else None
        return self.baseline / self.ours if self.ours else None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def get(self, suite: str, metric: str, baseline_name: str | None = None) -> Row | None:
        for r in self.rows:
            if r.suite == suite and r.metric == metric and (baseline_name is None or r.baseline_name == baseline_name):
                return r
        return None

    def as_dict(self) -> dict:
        return {
            "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
            "details": self.details,
            "skipped": self.skipped,
        }

    def table(self) -> str:
        head = ("suite", "metric", "ours", "baseline", "vs", "ratio")
        lines = [head]
        for r in self.rows:
            lines.append((
                r.suite, r.metric + (f" [{r.unit}]" if r.unit else ""), fmt(r.ours), fmt(r.baseline),
                r.baseline_name, f"{r.ratio:.2f}x" if r.ratio is not None else "",
            ))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        out = []
        for n, line in enumerate(lines):
            out.append("  ".join(str(c).ljust(w) if i < 2 or i == 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        for suite, why in self.skipped.items():
            out.append(f"skipped {suite}: {why}")
        return "\n".join(out)


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or (abs(x) >= 100 and float(x).is_integer()):
        return f"{int(x)}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"



def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_times() -> tuple[int, int] | None:
    """(all CPU time, the part the hypervisor gave to other machines: steal), in ticks, since boot; None where
    /proc/stat is missing. On a shared virtual machine the same run of `generate` measured 111-137 tok/s as the
    steal changed (benchmarks/NOTES.md session 16): the bench says how much was stolen while it measured."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    return sum(ticks), ticks[7] if len(ticks) > 7 else 0


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the CPU stolen between two cpu_times() readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])
