"""Human-readable tables (rich) for partitions and plans."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .split import Partition

__all__ = ["format_bytes", "print_partition"]

_PIPED_WIDTH = 10_000
"""Columns a table may take when stdout is not a terminal: wider than any row, so none is wrapped or cut."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_partition(partition: Partition, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: every row whole (the table takes its natural width)
            console = Console(width=_PIPED_WIDTH)
    units = {u.name: u for u in partition.units}
    console.print(escape(f"{partition.model or 'model'}: {partition.num_stages} stages ({partition.mode}, "
                         f"cut by {partition.by})"), soft_wrap=True)
    table = Table()
    for col in ("stage", "units", "params", "fwd ms", "bwd ms", "sends", "inputs"):
        table.add_column(col, justify="left" if col in ("units", "inputs") else "right")
    for stage in partition.stages:
        infos = [units[name] for name in stage.units]
        span = stage.units[0] if len(stage.units) == 1 else f"{stage.units[0]} .. {stage.units[-1]}"
        if stage.head:
            span = f"[head {stage.head}] {span}"
        sends = sum(v.nbytes for v in stage.send)
        table.add_row(str(stage.index), escape(f"{span} ({len(stage.units)})"), f"{sum(u.params for u in infos):,}",
                      f"{sum(u.forward_ms for u in infos):.3f}", f"{sum(u.backward_ms for u in infos):.3f}",
                      format_bytes(sends) if stage.send else "-", ", ".join(stage.inputs) or "-")
    console.print(table)
