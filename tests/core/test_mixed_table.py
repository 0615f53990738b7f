from __future__ import annotations

import csv
import io

from dsopt.mixed.table import ranked, render_csv


def _node(name: str, params: int, errors: dict[str, float]) -> dict:
    per = {"fp32": 4, "fp16": 2, "int8": 1}
    return {
        "node": name,
        "op": "MatMul",
        "precision": "int8",
        "bytes": params,
        "sensitivity": {
            p: {"bytes": per[p] * params, "rel_l2": e, "cosine": 1 - e * e / 2}
            for p, e in errors.items()
        },
    }


def test_rows_rank_the_most_sensitive_weight_first():
    entry = {
        "nodes": [
            _node("quiet", 100, {"fp32": 0.0, "fp16": 1e-5, "int8": 1e-3}),
            _node("loud", 10, {"fp32": 0.0, "fp16": 1e-4, "int8": 0.3}),
            _node("float-only", 50, {"fp32": 0.0}),
        ]
    }
    assert [n["node"] for n in ranked(entry)] == ["loud", "quiet", "float-only"]
    rows = list(csv.reader(io.StringIO(render_csv(entry))))
    head = rows[0]
    assert head[:6] == ["rank", "node", "op", "params", "precision", "bytes"]
    assert "int8 rel_l2" in head and "fp16 cosine" in head
    loud = dict(zip(head, rows[1], strict=True))
    assert loud["rank"] == "1" and loud["node"] == "loud" and loud["params"] == "10"
    assert float(loud["int8 rel_l2"]) == 0.3 and loud["int8 bytes"] == "10"
    assert dict(zip(head, rows[3], strict=True))["int8 rel_l2"] == ""  # no int8 candidate
