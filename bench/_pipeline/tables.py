"""The benchmark's printed tables, and its rows as JSON lines (``--rows``, read by ``bench/gpu.sh``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .measure import Throughput, pct

console = Console(width=160)


def run_label(args) -> str:
    """This run's name in the titles and rows: models, device, preloading and ``--label``."""
    return f"{args.models} models, {args.device}" + (", preloaded queue" if args.preload else "") + \
        (f", {args.label}" if args.label else "")


def print_latency(stages: dict[str, list[float]], label: str) -> None:
    table = Table(title=f"single photo latency, warm workers ({len(stages['infer'])} photos, ~1 MP JPEG; {label})")
    for col in ("stage", "p50 ms", "p95 ms"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, values in stages.items():
        table.add_row(name, f"{pct(values, 50):.0f}", f"{pct(values, 95):.0f}")
    console.print(table)


def throughput_rows(result: Throughput, args, label: str, model: str) -> list[dict]:
    """Prints the sustained run's table; returns its rows."""
    cpu = result.cpu_ms
    table = Table(title=f"sustained throughput, {args.uploads} distinct uploads ({label}; "
                        f"{model}, {args.classes} classes, {os.cpu_count()} cores)")
    for col in ("photos/s", "done", "CPU ms/photo, all processes", *[f"{k} ms" for k in cpu], "DB transactions/photo",
                "client ms (not the stack)"):
        table.add_column(col, justify="right")
    table.add_row(f"{result.photos_per_s:.2f}", f"{result.done}/{result.uploads}", f"{result.cpu_total:.1f}",
                  *[f"{v:.1f}" for v in cpu.values()], f"{result.transactions:.1f}", f"{result.client_ms:.1f}")
    console.print(table)
    rows = [{"bench": "pipeline", "what": f"sustained photos/s ({label}, {args.uploads} uploads)",
             "value": round(result.photos_per_s, 2), "unit": "photos/s"},
            {"bench": "pipeline", "what": f"CPU ms per photo, all processes ({label})",
             "value": round(result.cpu_total, 1), "unit": "ms",
             "note": ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())},
            {"bench": "pipeline", "what": f"DB transactions per photo ({label})",
             "value": round(result.transactions, 1), "unit": "transactions"},
            {"bench": "pipeline", "what": f"the benchmark's own CPU ms per photo, uploading and polling ({label})",
             "value": round(result.client_ms, 1), "unit": "ms"}]
    if result.done < result.uploads:
        console.print(f"[red]not every photo was scored: {result.counts}[/red]")
    return rows


def finished_message_rows(ms: float, label: str) -> list[dict]:
    """Prints the workers' CPU for a message whose photo a batch already finished; returns its row."""
    console.print(f"workers' CPU per message of a finished photo ({label}): {ms:.2f} ms")
    return [{"bench": "pipeline", "what": f"workers' CPU ms per message of a finished photo ({label})",
             "value": round(ms, 2), "unit": "ms"}]


def bound_rows(bounds: dict[str, float], result: Throughput, device: str, label: str) -> list[dict]:
    """Prints the pipeline against the networks alone; returns the rows. CPU-bound figures compare with the
    pipeline's CPU-bound capacity, the others with its sustained photos/s."""
    table = Table(title=f"the networks alone on pre-decoded photos, same run ({label})")
    for col in ("bound", "photos/s", "pipeline / bound"):
        table.add_column(col, justify="right" if col != "bound" else "left")
    rows = []
    # The CPU-bound figures do not move with other load on the machine: cores / CPU ms per photo.
    capacity = (os.cpu_count() or 2) / (result.cpu_total / 1000)
    if device == "cpu":
        table.add_row(f"pipeline, CPU-bound: {os.cpu_count()} cores / {result.cpu_total:.0f} CPU ms per photo",
                      f"{capacity:.2f}", "")
        rows.append({"bench": "pipeline", "what": f"pipeline CPU-bound capacity ({label})",
                     "value": round(capacity, 2), "unit": "photos/s"})
    for name, value in bounds.items():
        ratio = (capacity if "CPU-bound" in name else result.photos_per_s) / value
        table.add_row(name, f"{value:.2f}", f"{ratio:.0%}")
        rows.append({"bench": "pipeline", "what": f"{name} ({label})", "value": round(value, 2),
                     "unit": "photos/s", "note": f"pipeline reaches {ratio:.0%}"})
    console.print(table)
    return rows


def append_rows(path: Path | None, rows: list[dict]) -> None:
    if path:
        with path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
