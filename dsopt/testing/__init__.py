"""Testing helpers for dsopt and for plugin authors: run a pass and prove it on a model."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx

from dsopt.analysis import AnalysisManager
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassResult, verify_model
from dsopt.pattern import topological_order

__all__ = [
    "PROPERTY_EXAMPLES",
    "TOLERANCES",
    "apply_pass",
    "check_pass",
    "fired",
    "op_types",
    "ort_optimized_ops",
]

#: Examples per property test in the default CI run (at least 200); raise it for long runs.
PROPERTY_EXAMPLES = int(os.environ.get("DSOPT_PROPERTY_EXAMPLES", "200"))

#: (rtol, atol) per declared exactness; lossy passes use their declared `tolerance` as atol.
TOLERANCES = {"exact": (1e-5, 1e-6), "reassoc": (1e-4, 1e-5)}


def apply_pass(
    pass_: Pass, model: onnx.ModelProto, ctx: PassContext | None = None
) -> tuple[onnx.ModelProto, PassResult]:
    """Runs `pass_` on a copy of `model`; returns the exported result and the PassResult."""
    module = Module.from_proto(model)
    ctx = ctx or PassContext()
    ctx.analyses = AnalysisManager(module)
    result = pass_.run(module, ctx)
    for graph in module.graphs():
        graph.nodes = topological_order(graph)
    return module.to_proto(), result


def check_pass(
    pass_: Pass,
    model: onnx.ModelProto,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    ctx: PassContext | None = None,
    idempotent: bool = True,
) -> tuple[onnx.ModelProto, PassResult]:
    """Asserts the pass contract on `model` and returns the rewritten model.

    Checks: the result verifies when the input did (checker + strict shape inference); the
    onnxruntime outputs agree within the pass's exactness tolerance; `changed=False` leaves
    the exported bytes identical; a second run reports no change (when `idempotent`).
    """
    from dsopt import numerics
    from dsopt.testing.strategies import random_feeds

    baseline = Module.from_proto(model).to_proto().SerializeToString(deterministic=True)
    rewritten, result = apply_pass(pass_, model, ctx)
    if verify_model(model) is None:
        error = verify_model(rewritten)
        assert error is None, f"{pass_.name} broke the model: {error}"
    if not result.changed:
        assert rewritten.SerializeToString(deterministic=True) == baseline, (
            f"{pass_.name} reported changed=False but the model changed"
        )
    relative = None
    if pass_.exactness == "lossy" and pass_.bound == "relative":
        # Whole outputs within the bound, or every element within it (cancelling sums).
        relative = float(pass_.tolerance or 0.0)
        rtol, atol = 0.0, relative
    elif pass_.exactness == "lossy":
        rtol, atol = 0.0, float(pass_.tolerance or 0.0)
    else:
        rtol, atol = TOLERANCES[pass_.exactness]
    inputs = dict(feeds) if feeds is not None else random_feeds(model)
    report = numerics.check_equivalence(
        model, rewritten, inputs=[inputs], rtol=rtol, atol=atol, relative=relative
    )
    if not report.ok and pass_.exactness == "lossy" and _ill_conditioned(model, inputs, pass_):
        from hypothesis import control, reject

        if control.currently_in_test_context():
            reject()  # a random graph whose outputs no lossy pass can keep: draw another
    assert report.ok, f"{pass_.name} changed the outputs: {report.to_dict()}"
    if idempotent:
        _, again = apply_pass(pass_, rewritten, dataclasses.replace(ctx) if ctx else None)
        assert not again.changed, f"{pass_.name} is not idempotent: second run {again.stats}"
    return rewritten, result


def _ill_conditioned(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], pass_: Pass) -> bool:
    """Whether float noise of the lossy pass's size on the inputs alone breaks its own bound.

    A random graph can be nearly discontinuous (LayerNormalization over two values is the
    sign of their difference; a Relu of a cancelling sum), so any lossy rewrite flips it. The
    float model is run with every float input scaled by `1 + tolerance * N(0, 1)`; if that
    misses the pass's bound too, the example says nothing about the pass.
    """
    from dsopt import numerics

    tolerance = float(pass_.tolerance or 0.0)
    rng = np.random.default_rng(0)
    noisy = {}
    for name, value in feeds.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and value.size:
            value = value * (1 + tolerance * rng.standard_normal(value.shape)).astype(value.dtype)
        noisy[name] = value
    if all(np.array_equal(noisy[k], np.asarray(v)) for k, v in feeds.items()):
        return False  # no float input to perturb
    relative = tolerance if pass_.bound == "relative" else None
    reference = numerics.run_model(model, dict(feeds))
    perturbed = numerics.run_model(model, noisy)
    comparisons = numerics.compare_outputs(
        reference, perturbed, rtol=0.0, atol=tolerance, relative=relative
    )
    return not all(c.within_tolerance for c in comparisons)


def op_types(graph: onnx.GraphProto) -> list[str]:
    """The op types of `graph`'s nodes, in order (for asserting what a pass left)."""
    return [node.op_type for node in graph.node]


def fired(stats: Mapping[str, int | float | str]) -> dict[str, int | float | str]:
    """The statistics of a PassResult that are non-zero (the rules that fired)."""
    return {name: value for name, value in stats.items() if value}


def ort_optimized_ops(model: onnx.ModelProto) -> Counter[str]:
    """The op types onnxruntime's CPU provider runs after its own fusions (QDQ -> int8 kernels)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="dsopt-ort-") as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(folder, "ort.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
