"""Built-in instruments (print-after, dump-dir, progress), written as an ordinary plugin.

They read their settings from `ctx.options`: `print_after` (pass names, or `all`),
`print_after_change` (bool), `dump_dir` (folder for `NNN_<pass>.onnx`/`.txt`) and
`progress` (a callable taking the pass name and the record, set by the CLI).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import onnx

from dsopt.hookspecs import hookimpl
from dsopt.ir import Module, save_model
from dsopt.pass_infra import Pass, PassContext, PassRecord

__all__ = ["module_text"]


def module_text(module: Module) -> str:
    """The module as ONNX textual syntax (onnx.printer), weights elided."""
    model = module.to_proto()
    for tensor in model.graph.initializer:
        if tensor.ByteSize() > 256:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.ClearField("int64_data")
            tensor.ClearField("int32_data")
            tensor.ClearField("double_data")
    try:
        return onnx.printer.to_text(model)
    except Exception as e:  # noqa: BLE001 - the printer rejects some exotic models
        return f"<cannot print the model: {e}>"


@hookimpl
def dsopt_add_options(options: dict[str, Any]) -> None:
    """Declares the instrument settings with their defaults."""
    options.setdefault("print_after", ())
    options.setdefault("print_after_change", False)
    options.setdefault("dump_dir", None)
    options.setdefault("progress", None)


@hookimpl
def dsopt_after_pass(pass_: Pass, module: Module, ctx: PassContext, record: PassRecord) -> None:
    """Prints or dumps the IR after a pass, and reports progress."""
    options = ctx.options
    wanted = options.get("print_after") or ()
    if (
        "all" in wanted
        or pass_.name in wanted
        or (options.get("print_after_change") and record.changed)
    ):
        sys.stderr.write(f"// ----- IR after {pass_.describe()} (#{record.position}) -----\n")
        sys.stderr.write(module_text(module) + "\n")
    dump_dir = options.get("dump_dir")
    if dump_dir:
        folder = Path(dump_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{record.position:03d}_{pass_.name}"
        save_model(module.to_proto(), folder / f"{stem}.onnx")
        (folder / f"{stem}.txt").write_text(module_text(module) + "\n")
    progress = options.get("progress")
    if progress is not None:
        progress(pass_.name, record)
