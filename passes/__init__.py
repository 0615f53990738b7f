"""Built-in passes: one small file each, registered like any third-party plugin.

To add a pass: write `passes/<verb_noun>.py` with a frozen-dataclass `Pass` subclass
(`name`, `summary`, `stage`, `exactness`; fields are options), list it below, and add
`tests/passes/test_<verb_noun>.py` with a golden case and a hypothesis property test.
"""

from __future__ import annotations

from dsopt import hookimpl
from dsopt.passes.convert_float16 import ConvertFloat16
from dsopt.passes.convert_qoperator import ConvertQoperator
from dsopt.passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from dsopt.passes.eliminate_dead import EliminateDead
from dsopt.passes.eliminate_noops import EliminateNoops
from dsopt.passes.fold_bias_add import FoldBiasAdd
from dsopt.passes.fold_constant_chains import FoldConstantChains
from dsopt.passes.fold_constants import FoldConstants
from dsopt.passes.fold_conv_scale import FoldConvScale
from dsopt.passes.fold_pad import FoldPad
from dsopt.passes.fold_qdq import FoldQdq
from dsopt.passes.fuse_activations import FuseActivations
from dsopt.passes.fuse_attention import FuseAttention
from dsopt.passes.fuse_batch_norm import FuseBatchNorm
from dsopt.passes.fuse_contrib_ops import FuseContribOps
from dsopt.passes.fuse_layer_norm import FuseLayerNorm
from dsopt.passes.fuse_matmul_add import FuseMatmulAdd
from dsopt.passes.inline_constants import InlineConstants
from dsopt.passes.legalize_quantized import LegalizeQuantized
from dsopt.passes.merge_layout_chains import MergeLayoutChains
from dsopt.passes.prune_channels import PruneChannels
from dsopt.passes.quantize_dynamic import QuantizeDynamic
from dsopt.passes.quantize_static import QuantizeStatic
from dsopt.passes.quantize_weights import QuantizeWeights
from dsopt.passes.simplify_shapes import SimplifyShapes
from dsopt.passes.smooth_activations import SmoothActivations
from dsopt.passes.sparse_attention import SparseAttention
from dsopt.passes.sparsify_2to4 import Sparsify2to4
from dsopt.passes.upgrade_opset import UpgradeOpset
from dsopt.plugin import PassRegistry

BUILTIN_PASSES = (
    InlineConstants,
    EliminateNoops,
    SimplifyShapes,
    FoldConstants,
    UpgradeOpset,
    EliminateCommonSubexpressions,
    EliminateDead,
    FuseBatchNorm,
    FoldBiasAdd,
    FoldConvScale,
    FuseMatmulAdd,
    FuseActivations,
    FuseLayerNorm,
    FuseAttention,
    FoldConstantChains,
    MergeLayoutChains,
    FoldPad,
    FuseContribOps,
    FoldQdq,
    ConvertQoperator,
    SmoothActivations,
    QuantizeWeights,
    QuantizeStatic,
    QuantizeDynamic,
    LegalizeQuantized,
    ConvertFloat16,
    PruneChannels,
    Sparsify2to4,
    SparseAttention,
)


@hookimpl
def dsopt_register_passes(registry: PassRegistry) -> None:
    """Registers the built-in passes."""
    for pass_class in BUILTIN_PASSES:
        registry.add(pass_class)
