"""Passes, their results and context, and the PassManager that runs an ordered pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt.analysis import Analysis, AnalysisManager
from dsopt.errors import DsoptError, ModelError, PassError, UsageError, VerificationError
from dsopt.ir import Module, iter_graphs, save_model
from dsopt.pattern import topological_order

__all__ = [
    "Exactness",
    "Pass",
    "PassContext",
    "PassManager",
    "PassOption",
    "PassRecord",
    "PassResult",
    "PipelineReport",
    "Verify",
    "graph_counts",
    "verify_model",
    "verify_module",
]

logger = logging.getLogger(__name__)

Exactness = Literal["exact", "reassoc", "lossy"]
Verify = Literal["each", "end", "off"]


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass did: `changed` (False means every analysis is still valid) and statistics.

    `preserves` lists analyses still valid after a change; by default a change invalidates all.
    """

    changed: bool
    stats: Mapping[str, int | float | str] = dataclasses.field(default_factory=dict)
    preserves: tuple[type[Analysis[Any]], ...] = ()


@dataclasses.dataclass(frozen=True)
class PassOption:
    """One declared option of a pass: a dataclass field with a type, default and help."""

    name: str
    type: type
    default: Any
    help: str


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses whose fields are the options.

    Class attributes declare the metadata: `name` (kebab-case, unique), `summary` (one line),
    `stage`, `exactness` (`exact`, `reassoc` or `lossy`), `tolerance` (error bound of a lossy
    pass), `bound` (how the tolerance reads: `absolute` per element, or `relative` per output:
    cosine >= 1 - tolerance and relative L2 <= sqrt(2 * tolerance), for passes such as int8
    quantization whose element error depends on the model's ranges), `opsets` (inclusive
    default-domain range; None = open). `run` mutates the module in place and returns a
    PassResult.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    stage: ClassVar[str] = "canonicalize"
    exactness: ClassVar[Exactness] = "exact"
    tolerance: ClassVar[float | None] = None
    bound: ClassVar[Literal["absolute", "relative"]] = "absolute"
    opsets: ClassVar[tuple[int | None, int | None]] = (None, None)

    def run(self, module: Module, ctx: PassContext) -> PassResult:  # pragma: no cover
        """Rewrites `module` in place."""
        raise NotImplementedError

    # -- metadata helpers ------------------------------------------------------------------
    @classmethod
    def options(cls) -> list[PassOption]:
        """The declared options (dataclass fields), in declaration order."""
        hints = typing.get_type_hints(cls)
        return [
            PassOption(f.name, hints[f.name], f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def from_options(cls, raw: Mapping[str, str | int | float | bool]) -> Pass:
        """Builds the pass from option strings (`{max_size_mb=4}`), converting to field types."""
        known = {o.name: o for o in cls.options()}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            key_norm = key.replace("-", "_")
            if key_norm not in known:
                names = ", ".join(known) or "none"
                raise UsageError(f"pass '{cls.name}' has no option '{key}' (options: {names})")
            values[key_norm] = _convert_option(cls.name, known[key_norm], value)
        return cls(**values)

    def describe(self) -> str:
        """The pass as pipeline text, e.g. `fold-constants{max_size_mb=4.0}`."""
        changed = [
            f"{o.name}={getattr(self, o.name)}"
            for o in self.options()
            if getattr(self, o.name) != o.default
        ]
        return f"{self.name}{{{','.join(changed)}}}" if changed else self.name

    def applies_to(self, opset: int) -> bool:
        """Whether `opset` lies in the declared `opsets` range."""
        low, high = self.opsets
        return (low is None or opset >= low) and (high is None or opset <= high)


def _convert_option(pass_name: str, option: PassOption, value: Any) -> Any:
    kind = option.type
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float, str):
            return kind(value)
    except ValueError:
        pass
    else:
        return value
    raise UsageError(
        f"option '{option.name}' of pass '{pass_name}' must be {kind.__name__}, got {value!r}"
    )


@dataclasses.dataclass
class PassContext:
    """Everything a pass may consult besides the module itself.

    Args:
        target: The target name the pipeline runs for (None: target-independent).
        options: Global options (`shapes`, `allow_lossy`, ...).
        calibration: Calibration feeds for lossy passes, if any.
        hook: The plugin hook relay (`pm.hook`), for instruments; None runs without plugins.
        fused_ops: Non-standard ops (`domain::Op`) the target executes; empty without a target.
        max_opset: The newest default-domain opset the target executes (None: keep the model's).
        providers: Pass name -> the plugin that registered it, so errors can name the plugin.
    """

    target: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None
    hook: Any = None
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logger)
    analyses: AnalysisManager | None = None
    fused_ops: frozenset[str] = frozenset()
    max_opset: int | None = None
    providers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def supports(self, *ops: str) -> bool:
        """Whether the target executes every non-standard op in `ops` (`domain::Op`)."""
        return all(op in self.fused_ops for op in ops)


@dataclasses.dataclass
class PassRecord:
    """One row of the pipeline report."""

    name: str
    pipeline_text: str
    position: int
    round: int
    changed: bool
    skipped: str | None
    seconds: float
    stats: dict[str, int | float | str]
    nodes: int
    initializers: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PipelineReport:
    """What a pipeline run did: per-pass records plus counts before and after."""

    before: dict[str, int]
    after: dict[str, int] = dataclasses.field(default_factory=dict)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    verification: str = "off"
    seconds: float = 0.0
    #: Decisions the driver took on its own (e.g. a precision fallback), one line each.
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "before": self.before,
            "after": self.after,
            "verification": self.verification,
            "seconds": round(self.seconds, 6),
            "passes": [p.to_dict() for p in self.passes],
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def graph_counts(module: Module) -> dict[str, int]:
    """Nodes (incl. subgraphs), initializers and weight bytes of the module, without exporting."""
    nodes = 0
    constants: dict[int, gs.Constant] = {}
    for graph in module.graphs():
        nodes += len(graph.nodes)
        for node in graph.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant):
                    constants[id(tensor)] = tensor
            value = node.attrs.get("value") if node.op == "Constant" else None
            if isinstance(value, gs.Constant):
                constants[id(value)] = value
    for tensor in module.graph.outputs:
        if isinstance(tensor, gs.Constant):
            constants[id(tensor)] = tensor
    bits = 0
    for tensor in constants.values():
        shape = tensor.shape or ()
        bits += int(np.prod(shape, dtype=np.int64)) * _bits(tensor.dtype)
    size = (bits + 7) // 8
    initializers = sum(1 for t in constants.values() if t.name)
    return {"nodes": nodes, "initializers": initializers, "bytes": size}


#: Element widths of the sub-byte ONNX types (stored packed).
_SUB_BYTE_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    **{getattr(onnx.TensorProto, t): 2 for t in ("INT2", "UINT2") if hasattr(onnx.TensorProto, t)},
}

#: The same by ml_dtypes name (onnx maps INT4 to `ml_dtypes.int4`, one byte in numpy).
_SUB_BYTE_NAMES = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2}


def _bits(dtype: Any) -> int:
    """Bits per element; packed sub-byte types count their width, not a byte."""
    try:
        numpy_dtype = np.dtype(dtype)
        return _SUB_BYTE_NAMES.get(numpy_dtype.name, 8 * int(numpy_dtype.itemsize))
    except TypeError:  # graphsurgeon keeps bfloat16/float8/int4 as onnx enum values
        try:
            if int(dtype) in _SUB_BYTE_BITS:
                return _SUB_BYTE_BITS[int(dtype)]
            return 8 * max(1, int(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)).itemsize))
        except (KeyError, TypeError, ValueError):
            return 8


def verify_model(
    model: onnx.ModelProto, path: Path | None = None, *, strict: bool = True
) -> str | None:
    """Full onnx.checker, then (if `strict`) strict shape inference; the first error or None."""
    try:
        if path is not None:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker raises ValidationError and others
        return f"onnx.checker: {_first_line(e)}"
    if path is None and strict:
        try:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except Exception as e:  # noqa: BLE001 - InferenceError and friends
            return f"shape inference: {_first_line(e)}"
    return None


def verify_module(module: Module, *, strict: bool = True) -> str | None:
    """`verify_model` on `module` at a cost that does not grow with its weights.

    The checker and shape inference see `Module.structure_proto()` (weights as typed graph
    inputs); the weights' data sizes are checked separately.
    """
    error = module.weight_data_error()
    if error is not None:
        return f"onnx.checker: {error}"
    return verify_model(module.structure_proto(), strict=strict)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else text)[:300]


_SNAPSHOT_LIMIT = 256 * 2**20


class PassManager:
    """Runs passes in order, with verification, instrumentation hooks and a crash reproducer.

    Args:
        passes: The pipeline, already instantiated.
        verify: `each` (after every changing pass), `end`, or `off`.
        rounds: Repeat the whole pipeline up to this many times while anything changes.
        crash_dir: Where to write `dsopt-crash-<hash>/` reproducers (default: $DSOPT_CRASH_DIR,
            else the system temp folder).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: Verify = "end",
        rounds: int = 1,
        crash_dir: Path | None = None,
    ) -> None:
        if verify not in ("each", "end", "off"):
            raise UsageError(f"--verify must be each, end or off, not '{verify}'")
        self.passes = list(passes)
        self.verify = verify
        self.rounds = max(1, rounds)
        self.crash_dir = crash_dir
        self._input: onnx.ModelProto | None = None

    def run(self, module: Module, ctx: PassContext) -> PipelineReport:
        """Runs the pipeline on `module` in place and returns the report."""
        ctx.analyses = AnalysisManager(module)
        report = PipelineReport(before=graph_counts(module))
        started = time.perf_counter()
        # The reproducer of a failing pass is this input plus the passes run so far.
        self._input = module.to_proto() if graph_counts(module)["bytes"] < _SNAPSHOT_LIMIT else None
        self._strict = True
        if self.verify != "off":
            self._check_input(module)
        done: list[str] = []
        position = 0
        for round_index in range(self.rounds):
            changed_any = False
            for pass_ in self.passes:
                record = self._run_one(module, ctx, pass_, position, round_index, done)
                report.passes.append(record)
                changed_any |= record.changed
                done.append(pass_.describe())
                position += 1
            if not changed_any:
                break
        if self.verify == "end":
            error = verify_module(module, strict=self._strict)
            if error is not None:
                self._blame_input_shapes(module, error)
                raise VerificationError(
                    f"broken model after the pipeline ({', '.join(done)}): {error}",
                    hint="rerun with --verify each to find the pass",
                )
        if self.verify != "off":
            report.verification = f"ok ({self.verify})" + (
                "" if self._strict else "; checker only: the input fails strict shape inference"
            )
        report.after = graph_counts(module)
        report.seconds = time.perf_counter() - started
        return report

    def _run_one(
        self,
        module: Module,
        ctx: PassContext,
        pass_: Pass,
        position: int,
        round_index: int,
        done: Sequence[str],
    ) -> PassRecord:
        assert ctx.analyses is not None
        if not pass_.applies_to(module.opset):
            low, high = pass_.opsets
            reason = f"opset {module.opset} outside [{low or 1}, {high or 'latest'}]"
            counts = graph_counts(module)
            return PassRecord(
                pass_.name,
                pass_.describe(),
                position,
                round_index,
                False,
                reason,
                0.0,
                {},
                counts["nodes"],
                counts["initializers"],
                counts["bytes"],
            )
        if ctx.hook is not None:
            ctx.hook.dsopt_before_pass(pass_=pass_, module=module, ctx=ctx)
        started = time.perf_counter()
        try:
            result = pass_.run(module, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(
                    f"Pass developer: {type(pass_).__name__}.run must return PassResult, "
                    f"not {type(result).__name__}"
                )
        except DsoptError:
            raise
        except Exception as e:
            reproducer = self._write_reproducer([*done, pass_.describe()])
            before = ", ".join(done[-5:]) or "none"
            plugin = ctx.providers.get(pass_.name)
            raise PassError(
                (f"plugin '{plugin}': " if plugin else "")
                + f"pass '{pass_.name}' (#{position}) failed: {type(e).__name__}: {_first_line(e)}"
                f" [passes before it: {before}]",
                hint=f"reproduce with: dsopt optimize {reproducer}/input.onnx --passes "
                f'"$(cat {reproducer}/pipeline.txt)" -o /tmp/out.onnx --debug',
            ) from e
        seconds = time.perf_counter() - started
        if result.changed:
            module.generation += 1
            ctx.analyses.invalidate(result.preserves)
            for graph in module.graphs():
                graph.nodes = topological_order(graph)
            if self.verify == "each":
                error = verify_module(module, strict=self._strict)
                if error is not None:
                    self._blame_input_shapes(module, error)
                    reproducer = self._write_reproducer([*done, pass_.describe()])
                    raise VerificationError(
                        f"broken model after pass '{pass_.name}' (#{position}): {error}",
                        hint=f"reproducer written to {reproducer}",
                    )
        counts = graph_counts(module)
        record = PassRecord(
            name=pass_.name,
            pipeline_text=pass_.describe(),
            position=position,
            round=round_index,
            changed=result.changed,
            skipped=None,
            seconds=seconds,
            stats=dict(result.stats),
            nodes=counts["nodes"],
            initializers=counts["initializers"],
            bytes=counts["bytes"],
        )
        if ctx.hook is not None:
            ctx.hook.dsopt_after_pass(pass_=pass_, module=module, ctx=ctx, record=record)
        return record

    def _check_input(self, module: Module) -> None:
        """Refuses an input that fails onnx.checker.

        An input that passes the checker but not strict shape inference is accepted, and later
        verification then uses the checker only.
        """
        error = verify_module(module)
        if error is not None and not error.startswith("shape inference:"):
            where = f"{module.source}: " if module.source else ""
            raise ModelError(
                f"{where}the input is not a valid ONNX model: {error}",
                hint="fix the model (or its exporter); --verify off optimizes it unchecked",
            )
        strict_error = error
        if strict_error is not None:
            self._strict = False
            logger.warning(
                "the input fails strict shape inference (%s); verifying with the checker only",
                strict_error,
            )

    def _blame_input_shapes(self, module: Module, error: str) -> None:
        """Raises ModelError when a shape clash after a pass is the input's own contradiction.

        A model may declare output or value_info shapes its computation contradicts (found by
        onnx's data propagation, e.g. through Shape -> Reshape); once a pass makes the shape
        visible, the checker rejects what the input already claimed.
        """
        if "existing shape differ" not in error or self._input is None:
            return
        try:
            onnx.shape_inference.infer_shapes(self._input, strict_mode=True, data_prop=True)
        except Exception as e:  # noqa: BLE001 - InferenceError and friends
            if "existing shape differ" in str(e):
                where = f"{module.source}: " if module.source else ""
                raise ModelError(
                    f"{where}the model's declared shapes contradict what it computes: "
                    f"{_first_line(e)}",
                    hint="fix the output/value_info shapes (or the exporter); "
                    "--verify off optimizes it unchecked",
                ) from e

    def _write_reproducer(self, passes: Sequence[str]) -> Path:
        base = self.crash_dir or Path(os.environ.get("DSOPT_CRASH_DIR", tempfile.gettempdir()))
        text = ",".join(passes)
        digest = hashlib.sha256(text.encode())
        if self._input is not None:
            digest.update(self._input.SerializeToString(deterministic=True))
        folder = base / f"dsopt-crash-{digest.hexdigest()[:12]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if self._input is not None:
                save_model(self._input, folder / "input.onnx")
            (folder / "pipeline.txt").write_text(text + "\n")
        except OSError as e:
            logger.warning("could not write the crash reproducer to %s: %s", folder, e)
        return folder


def functional(
    pass_: Pass, ctx_factory: Callable[[], PassContext] = PassContext
) -> Callable[[Module], tuple[Module, PassResult]]:
    """A pure form of `pass_`: clones the module first (for tests)."""

    def apply(module: Module) -> tuple[Module, PassResult]:
        twin = module.clone()
        ctx = ctx_factory()
        ctx.analyses = AnalysisManager(twin)
        result = pass_.run(twin, ctx)
        for graph in iter_graphs(twin.graph):
            graph.nodes = topological_order(graph)
        return twin, result

    return apply


__all__ += ["functional"]
