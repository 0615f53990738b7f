"""The sensitivity table of `--precision mixed`: every weight, most sensitive first, as CSV.

Drawn from report.json's `mixed` entry alone, like the Pareto plot: one row per weight
(node, op, parameters, chosen precision) with, for each candidate precision, its bytes, the
outputs' relative L2 error and cosine with that weight alone lowered, and the SQNR of the
node's own output where it was measured. Rows are ranked by the error of the weight's
smallest candidate (how much pushing it to the floor costs), the most sensitive first.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ranked", "render_csv", "write_table"]

#: Per-candidate columns, in order.
_FIELDS = ("bytes", "rel_l2", "cosine", "sqnr_db")


def _floor_error(node: Mapping[str, Any]) -> float:
    """The relative L2 error of the node's smallest candidate (0 when it has only fp32)."""
    candidates = node["sensitivity"].values()
    smallest = min(candidates, key=lambda c: (c["bytes"], -c["rel_l2"]))
    return float(smallest["rel_l2"])


def ranked(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The `mixed` entry's nodes, most sensitive first (ties: more parameters first)."""
    nodes: Sequence[Mapping[str, Any]] = entry["nodes"]
    return sorted(
        nodes, key=lambda n: (-_floor_error(n), -n["sensitivity"]["fp32"]["bytes"], n["node"])
    )


def render_csv(entry: Mapping[str, Any]) -> str:
    """The table as CSV text: rank, node, op, params, precision, then per-candidate columns."""
    nodes = ranked(entry)
    precisions: list[str] = []
    for node in nodes:
        precisions.extend(p for p in node["sensitivity"] if p not in precisions)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    head = ["rank", "node", "op", "params", "precision", "bytes"]
    writer.writerow(head + [f"{p} {field}" for p in precisions for field in _FIELDS])
    for rank, node in enumerate(nodes, 1):
        row: list[Any] = [
            rank,
            node["node"],
            node["op"],
            node["sensitivity"]["fp32"]["bytes"] // 4,
            node["precision"],
            node["bytes"],
        ]
        for precision in precisions:
            measured = node["sensitivity"].get(precision, {})
            row.extend(_cell(measured.get(field)) for field in _FIELDS)
        writer.writerow(row)
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_table(entry: Mapping[str, Any], path: str | Path) -> Path:
    """Writes `render_csv(entry)` to `path`."""
    path = Path(path)
    path.write_text(render_csv(entry))
    return path
