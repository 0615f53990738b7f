from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.pass_infra import PassContext, verify_model
from dsopt.passes import PruneChannels
from dsopt.quant.calibration import CalibrationData
from dsopt.testing import apply_pass, check_pass, fired, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/prune-channels")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(PruneChannels(ratio=0.5), case)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


@st.composite
def dead_channel_models(draw: st.DrawFn) -> tuple[onnx.ModelProto, int, int]:
    """Conv chains (BN, Relu, depthwise, Concat) ending in Flatten -> Gemm, `dead` of each
    layer's `channels` output channels with zero weights and bias (so zero after Relu)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels = draw(st.integers(2, 6))
    dead = draw(st.integers(1, channels - 1))
    layers = draw(st.integers(1, 3))
    size = draw(st.sampled_from([3, 4]))
    nodes, inits = [], []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    x, width = "x", draw(st.integers(1, 3))  # width: the next conv's input channels
    for i in range(layers):
        kernel = draw(st.sampled_from([1, 3]))
        w = rng.standard_normal((channels, width, kernel, kernel))
        b = rng.standard_normal(channels)
        gone = rng.permutation(channels)[:dead]
        w[gone], b[gone] = 0.0, 0.0
        ins = [x, init(f"w{i}", w)] + ([init(f"b{i}", b)] if draw(st.booleans()) else [])
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], pads=[pad] * 4, name=f"conv{i}"))
        x = f"c{i}"
        if draw(st.booleans()):
            scale, mean = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
            beta = rng.standard_normal(channels)
            mean[gone], beta[gone] = 0.0, 0.0  # BN keeps dead channels at zero
            var = rng.uniform(0.5, 2, channels)
            params = [init(f"bn{i}_{k}", v) for k, v in enumerate((scale, beta, mean, var))]
            nodes.append(helper.make_node("BatchNormalization", [x, *params], [f"n{i}"]))
            x = f"n{i}"
        nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
        x = f"r{i}"
        if draw(st.booleans()):  # depthwise: pruned with its producer
            dw = init(f"dw{i}", rng.standard_normal((channels, 1, 3, 3)))
            nodes.append(helper.make_node("Conv", [x, dw], [f"d{i}"], group=channels, pads=[1] * 4))
            x = f"d{i}"
        if draw(st.booleans()):  # channel concat with the layer input's own channels
            nodes.append(helper.make_node("Concat", [x, f"r{i}"], [f"k{i}"], axis=1))
            x, width = f"k{i}", 2 * channels
        else:
            width = channels
    head = draw(st.sampled_from(["gap", "flatten"]))
    if head == "gap":
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["p"]))
        x, features = "p", width
    else:
        features = width * size * size
    nodes.append(helper.make_node("Flatten", [x], ["f"], axis=1))
    nodes.append(
        helper.make_node("Gemm", ["f", init("g", rng.standard_normal((features, 5)))], ["y"])
    )
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, None, size, size])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    first = next(t for t in model.graph.initializer if t.name == "w0")
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = first.dims[1]
    return model, channels, dead


@given(case=dead_channel_models())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_dead_channels_prune_exactly(case):
    model, channels, dead = case
    ratio = (dead + 0.5) / channels
    rewritten, result = check_pass(PruneChannels(ratio=ratio), model)
    assert result.stats["channels-removed"] >= dead  # every layer lost its dead channels
    assert result.stats["params-after"] < result.stats["params-before"]
    feeds = strategies.random_feeds(model, seed=1)
    (before,) = _run(model, feeds)
    (after,) = _run(rewritten, feeds)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@given(
    case=dead_channel_models(),
    ratio=st.floats(0.0, 0.95),
    multiple=st.sampled_from([1, 2, 4]),
    criterion=st.sampled_from(["l1", "l2"]),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_chains_pruned_at_random_ratios_stay_valid(case, ratio, multiple, criterion):
    model = case[0]
    rewritten, result = apply_pass(PruneChannels(criterion, ratio, multiple=multiple), model)
    assert verify_model(rewritten) is None
    feeds = strategies.random_feeds(model)
    (before,), (after,) = _run(model, feeds), _run(rewritten, feeds)
    assert after.shape == before.shape and np.isfinite(after).all()
    assert result.changed == (result.stats["channels-removed"] > 0)
    for tensor in rewritten.graph.initializer:
        if tensor.name.startswith("w") and result.changed:
            assert tensor.dims[0] % multiple == 0 or tensor.dims[0] == case[1]


@given(
    model=strategies.models(containing=("Conv", "Relu"), dynamic=False),
    ratio=st.floats(0.0, 0.9),
    multiple=st.sampled_from([1, 2]),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_random_graphs_stay_valid(model, ratio, multiple):
    rewritten, result = apply_pass(PruneChannels(ratio=ratio, multiple=multiple), model)
    assert verify_model(rewritten) is None
    feeds = strategies.random_feeds(model)
    before, after = _run(model, feeds), _run(rewritten, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    if not result.changed:
        assert (
            rewritten.SerializeToString() == Module.from_proto(model).to_proto().SerializeToString()
        )


def _chain(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER + text)


def _conv_model(channels: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    text = """
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) {
      a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      r = Relu (a)
      y = Conv <pads = [1, 1, 1, 1]> (r, w2)
    }"""
    model = _chain(text)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((channels, 2, 3, 3), np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal((3, channels, 3, 3), np.float32), "w2"),
        ]
    )
    return model


def _residual_net() -> onnx.ModelProto:
    """A small ResNet: stem, an identity block, a downsampling block, pool and classifier."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name, x, cin, cout, stride=1, relu=True):
        w = numpy_helper.from_array(
            (rng.standard_normal((cout, cin, 3, 3)) * 0.2).astype(np.float32), f"{name}_w"
        )
        b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"{name}_b")
        inits.extend([w, b])
        out = f"{name}_y"
        nodes.append(
            helper.make_node(
                "Conv", [x, w.name, b.name], [out], name=name, pads=[1] * 4, strides=[stride] * 2
            )
        )
        if relu:
            nodes.append(helper.make_node("Relu", [out], [f"{name}_r"]))
            return f"{name}_r"
        return out

    stem = conv("stem", "x", 3, 16)
    a = conv("a", stem, 16, 16)
    b = conv("b", a, 16, 16, relu=False)
    nodes += [helper.make_node("Add", [b, stem], ["s1"]), helper.make_node("Relu", ["s1"], ["r1"])]
    c = conv("c", "r1", 16, 32, stride=2)
    d = conv("d", c, 32, 32, relu=False)
    down = conv("down", "r1", 16, 32, stride=2, relu=False)
    nodes += [helper.make_node("Add", [d, down], ["s2"]), helper.make_node("Relu", ["s2"], ["r2"])]
    nodes += [
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    inits += [
        numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_ratio_zero_is_byte_identical():
    model = _residual_net()
    rewritten, result = apply_pass(PruneChannels(), model)
    assert not result.changed
    assert rewritten.SerializeToString() == Module.from_proto(model).to_proto().SerializeToString()
    assert result.stats["params-after"] == result.stats["params-before"]


def test_residual_group_is_left_alone_and_counted():
    model = _residual_net()
    rewritten, result = apply_pass(PruneChannels(ratio=0.5, multiple=8), model)
    stats = fired(result.stats)
    # the stem, each block's second conv and the downsample feed a residual Add
    assert stats["skipped-residual-group"] == 4 and stats["layers-pruned"] == 2
    assert stats["skipped-graph-output"] == 1  # the classifier Gemm
    assert verify_model(rewritten) is None
    for tensor in rewritten.graph.initializer:
        if tensor.name.endswith("_pruned"):
            raise AssertionError("no weight is shared here")
    counts = [t.dims[0] for t in rewritten.graph.initializer if len(t.dims) == 4]
    assert all(c % 8 == 0 for c in counts)
    feeds = strategies.random_feeds(model)
    (before,), (after,) = _run(model, feeds), _run(rewritten, feeds)
    assert after.shape == before.shape


def test_ratio_min_channels_multiple_and_protect():
    model = _conv_model(channels=10)
    _, result = apply_pass(PruneChannels(ratio=0.9, min_channels=3), model)
    assert result.stats["channels-removed"] == 7
    _, result = apply_pass(PruneChannels(ratio=0.5, multiple=4), model)
    assert result.stats["channels-removed"] == 2  # keep 5 -> 8
    model.graph.node[0].name = "keep_me"
    _, result = apply_pass(PruneChannels(ratio=0.5, protect="keep_me"), model)
    assert not result.changed and result.stats["skipped-protected"] == 1


def test_l2_and_target_rank_by_weight_norm():
    model = _conv_model(channels=4)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[2] *= 1e-3  # the weakest channel
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    for option in ({"criterion": "l2", "ratio": 0.25}, {"target": 0.2}):
        rewritten, result = apply_pass(PruneChannels(**option), model)
        assert result.stats["channels-removed"] == 1, option
        kept = numpy_helper.to_array(rewritten.graph.initializer[0])
        np.testing.assert_array_equal(kept, w1[[0, 1, 3]])


def test_activation_criterion_uses_calibration_and_requires_it():
    model = _conv_model(channels=4)
    with pytest.raises(UsageError, match="criterion=activation"):
        apply_pass(PruneChannels(criterion="activation", ratio=0.5), model)
    feeds = [strategies.random_feeds(model, seed=s) for s in range(3)]
    ctx = PassContext(calibration=CalibrationData.from_feeds(feeds))
    rewritten, result = apply_pass(PruneChannels(criterion="activation", ratio=0.5), model, ctx)
    assert result.stats["channels-removed"] == 2
    assert verify_model(rewritten) is None


@pytest.mark.parametrize(
    "options",
    [{"criterion": "l3"}, {"ratio": 1.0}, {"ratio": 0.2, "target": 0.2}, {"multiple": 0}],
)
def test_bad_options_name_the_option(options):
    with pytest.raises(UsageError, match="prune-channels"):
        PruneChannels(**options)


def test_unknown_consumer_leaves_the_producer():
    model = _chain("""
    g (float[1, 2, 4, 4] x) => (float[1, 16, 4] y)
      <float[4, 2, 1, 1] w = {1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5},
       int64[3] s = {1, 16, 4}> {
      a = Conv (x, w)
      y = Reshape (a, s)
    }""")
    _, result = check_pass(PruneChannels(ratio=0.5), model)
    assert not result.changed and result.stats["skipped-graph-output"] == 0
    assert result.stats["skipped-consumer"] == 1


def test_matmul_chain_prunes_columns_and_rows():
    rng = np.random.default_rng(3)
    model = _chain("""
    g (float[2, 3, 8] x) => (float[2, 3, 5] y) {
      h = MatMul (x, w1)
      c = Add (h, bias)
      r = Relu (c)
      y = MatMul (r, w2)
    }""")
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((8, 6), np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "bias"),
            numpy_helper.from_array(rng.standard_normal((6, 5), np.float32), "w2"),
        ]
    )
    rewritten, result = apply_pass(PruneChannels(ratio=0.5), model)
    assert fired(result.stats)["removed-MatMul"] == 3
    dims = {t.name: list(t.dims) for t in rewritten.graph.initializer}
    assert dims == {"w1": [8, 3], "bias": [3], "w2": [3, 5]}
    assert verify_model(rewritten) is None
