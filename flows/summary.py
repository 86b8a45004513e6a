"""Human-readable summaries of flow results for the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_ingest_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """A table of counts (status, reject reasons) and of the work each stage did."""
    console = console or Console()
    table = Table(title="ingest", show_header=True)
    table.add_column("count")
    table.add_column("value", justify="right")
    for key in ("input", "downloaded", "failed", "kept", "rejected"):
        table.add_row(key, str(summary[key]))
    for key, value in sorted(summary["failed_by_status"].items()):
        table.add_row(f"  failed: {key}", str(value))
    for key, value in sorted(summary["rejected_by_reason"].items()):
        table.add_row(f"  rejected: {key}", str(value))
    for stage, work in summary["work"].items():
        table.add_row(f"{stage} shards", ", ".join(f"{k} {v}" for k, v in sorted(work.items())) or "none")
    console.print(table)
    if summary.get("failed_by_error"):
        console.print("most common download errors:")
        for error, count in list(summary["failed_by_error"].items())[:5]:
            console.print(f"  {count:6d}  {error[:100]}")
