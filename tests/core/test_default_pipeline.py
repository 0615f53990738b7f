"""The whole default (lossless) pipeline keeps onnxruntime outputs equal on random graphs."""

from __future__ import annotations

import onnx
from hypothesis import given, settings

import dsopt
from dsopt import numerics
from dsopt.testing import PROPERTY_EXAMPLES, strategies


def _check_default_pipeline(model: onnx.ModelProto) -> dsopt.OptimizeResult:
    result = dsopt.optimize(model, verify="each")
    optimized = result.module.to_proto()
    feeds = strategies.random_feeds(model)
    report = numerics.check_equivalence(model, optimized, inputs=[feeds], rtol=1e-4, atol=1e-5)
    assert report.ok, report.to_dict()
    assert [i.name for i in optimized.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in optimized.graph.output] == [o.name for o in model.graph.output]
    assert result.report.after["nodes"] <= result.report.before["nodes"]
    return result


@given(model=strategies.models())
@settings(max_examples=PROPERTY_EXAMPLES)
def test_default_pipeline_is_lossless_on_random_graphs(model):
    _check_default_pipeline(model)


@given(model=strategies.models(dynamic=False, max_ops=16))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_default_pipeline_on_static_graphs_is_deterministic(model):
    first = _check_default_pipeline(model).module.to_proto().SerializeToString(deterministic=True)
    second = dsopt.optimize(model).module.to_proto().SerializeToString(deterministic=True)
    assert first == second
