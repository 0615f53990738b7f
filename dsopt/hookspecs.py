"""The plugin hooks of dsopt; built-in passes and targets implement them like any plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    import numpy as np
    import onnx

    from dsopt.ir import Module
    from dsopt.pass_infra import Pass, PassContext, PassRecord
    from dsopt.pipeline import Pipeline
    from dsopt.plugin import PassRegistry, TargetRegistry

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "dsopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dsopt_register_passes(registry: PassRegistry) -> None:
    """Register pass classes with `registry.add(PassClass)`.

    Called once per run, when the plugin host starts, for every plugin.

    :param registry: The pass registry; `add` raises PluginError on a duplicate name and
        names both providers.

    .. versionadded:: 0.1
    """


@hookspec
def dsopt_register_targets(registry: TargetRegistry) -> None:
    """Register targets with `registry.add(Target(...))`.

    Called once per run, when the plugin host starts, for every plugin.

    :param registry: The target registry; duplicate names or aliases raise PluginError.

    .. versionadded:: 0.1
    """


@hookspec
def dsopt_extend_pipeline(pipeline: Pipeline, target: str | None) -> None:
    """Edit the default pipeline of a target before it runs, e.g. `pipeline.insert_after(...)`.

    Called once per run when the pipeline comes from a target's defaults (not when the user
    gave `--passes`).

    :param pipeline: The mutable pipeline (pass names and options).
    :param target: The target name, or None for the target-independent default.

    .. versionadded:: 0.1
    """


@hookspec
def dsopt_before_pass(pass_: Pass, module: Module, ctx: PassContext) -> None:
    """Observe the module before a pass runs (instruments: timing, dumps, progress).

    Called before every pass that applies to the model's opset.

    :param pass_: The pass about to run.
    :param module: The module; hooks must not mutate it.
    :param ctx: The pass context.

    .. versionadded:: 0.1
    """


@hookspec
def dsopt_after_pass(pass_: Pass, module: Module, ctx: PassContext, record: PassRecord) -> None:
    """Observe the module after a pass ran (print-after, dump-dir, statistics).

    Called after every pass that ran, with its report row.

    :param pass_: The pass that ran.
    :param module: The module after the pass; hooks must not mutate it.
    :param ctx: The pass context.
    :param record: The pass's report row (changed, seconds, stats, counts).

    .. versionadded:: 0.1
    """


@hookspec
def dsopt_add_options(options: dict[str, Any]) -> None:
    """Declare plugin-wide options (name -> default) readable by passes from `ctx.options`.

    Called once per run before the pipeline is built; user values from the config file
    override the defaults.

    :param options: The option table to add defaults to.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def dsopt_calibration_data(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]] | None,
    precision: str | None,
    options: Mapping[str, Any],
) -> Iterable[Mapping[str, np.ndarray]] | None:
    """Provide calibration feeds when the run needs them and the user gave none.

    Called once per `optimize`/`compile` run whose precision stage calibrates
    (`--precision int8` or `mixed`, or a pipeline with `quantize-static`) when neither
    `--calib` nor `calibration=` was given; the user's data always wins. The first plugin to
    return something other than None provides the data (firstresult); report.json names it
    under `calibration.plugin`.

    :param model: The model's structure (inputs, outputs, nodes); float weights over 4 KB may
        carry only dims and dtype, so read input names, dtypes and shapes from it, not weights.
    :param shapes: The user's input shape overrides (`--shape`), or None.
    :param precision: The precision asked for (`int8`, `mixed`, ...), or None.
    :param options: The run's global options (plugin defaults from `dsopt_add_options`).
    :return: A `dsopt.quant.calibration.CalibrationData`, or an iterable of feeds (each a
        mapping input name -> numpy array, one sample), or None to pass. Other values, an
        empty iterable or a feed that does not fit the model's inputs raise PluginError naming
        the plugin.

    .. versionadded:: 0.1 (plugin contract 1.1)
    """
