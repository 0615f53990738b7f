"""dsopt: a verified, plugin-based optimizer and compiler for ONNX models."""

from __future__ import annotations

from dsopt.analysis import (
    Analysis,
    AnalysisManager,
    GraphView,
    Shapes,
    TensorType,
    TopologicalOrder,
)
from dsopt.backend import Artifact, Target
from dsopt.driver import CompileResult, OptimizeResult, compile, optimize
from dsopt.errors import (
    CheckFailed,
    DsoptError,
    LoweringError,
    ModelError,
    PassError,
    PluginError,
    UsageError,
    VerificationError,
)
from dsopt.hookspecs import hookimpl
from dsopt.ir import Module
from dsopt.pass_infra import Pass, PassContext, PassManager, PassResult
from dsopt.pipeline import Pipeline, parse_pipeline
from dsopt.plugin import PluginHost

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AnalysisManager",
    "Artifact",
    "CheckFailed",
    "CompileResult",
    "DsoptError",
    "GraphView",
    "LoweringError",
    "ModelError",
    "Module",
    "OptimizeResult",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "Pipeline",
    "PluginError",
    "PluginHost",
    "Shapes",
    "Target",
    "TensorType",
    "TopologicalOrder",
    "UsageError",
    "VerificationError",
    "__version__",
    "compile",
    "hookimpl",
    "optimize",
    "parse_pipeline",
]
