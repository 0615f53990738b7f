"""Build the benchmark models into benchmarks/models/ (gitignored).

* resnet18_style.onnx: a ResNet-18-shaped CNN written here in plain torch (conv/bn/relu basic
  blocks, 1x3x224x224), random weights and random BatchNorm statistics.
* resnet18_style_unfolded.onnx: the same export with `do_constant_folding=False`, so the
  exporter's own Conv+BatchNormalization fusion and constant folding are left to the optimizers.
* bert_6l_384h.onnx: transformers BertModel(6 layers, hidden 384, 6 heads, intermediate 1536),
  random weights (no hub download), eager attention, static inputs [1, 128].
* bert_6l_384h_dynamic.onnx: the same model with dynamic batch and sequence axes.
* ppocr_det.onnx, ppocr_rec.onnx, ppocr_cls.onnx: the PP-OCR models shipped inside the
  rapidocr-onnxruntime wheel (downloaded with `pip download --no-deps`, no model hub).

All torch exports use the TorchScript exporter (`dynamo=False`, opset 17): the dynamo exporter
needs onnxscript, which the bench extra does not install.

Usage: python benchmarks/export_models.py [--only NAME ...] [--force]
Needs the `bench` extra: pip install -e '.[bench]'  (torch==2.13.0 is a CPU wheel).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
CACHE = HERE / ".cache"
OPSET = 17
SEED = 0
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
PPOCR_FILES = {
    "ppocr_det.onnx": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "ppocr_rec.onnx": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "ppocr_cls.onnx": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}


def _resnet() -> tuple[object, tuple[object, ...], list[str], list[str], dict | None]:
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + identity)

    class ResNet(nn.Module):
        def __init__(self, widths=(64, 128, 256, 512), depth=(2, 2, 2, 2), classes=1000):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            blocks, cin = [], widths[0]
            for i, (w, n) in enumerate(zip(widths, depth, strict=True)):
                for j in range(n):
                    blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                    cin = w
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    torch.manual_seed(SEED)
    model = ResNet()
    with torch.no_grad():  # non-trivial BN statistics, so folding BN actually changes weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    model.eval()
    return model, (torch.randn(1, 3, 224, 224),), ["input"], ["logits"], None


def _bert(dynamic: bool) -> tuple[object, tuple[object, ...], list[str], list[str], dict | None]:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    bert = BertModel(config, add_pooling_layer=True).eval()

    class Encoder(torch.nn.Module):  # keyword call: forward's positional order varies by release
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=True,
            )
            return out.last_hidden_state, out.pooler_output

    model = Encoder().eval()
    seq = 128
    args = (
        torch.randint(0, config.vocab_size, (1, seq)),
        torch.ones(1, seq, dtype=torch.int64),
        torch.zeros(1, seq, dtype=torch.int64),
    )
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    outputs = ["last_hidden_state", "pooler_output"]
    axes = None
    if dynamic:
        axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        axes["pooler_output"] = {0: "batch"}
    return model, args, inputs, outputs, axes


TORCH_MODELS = {
    "resnet18_style.onnx": _resnet,
    "resnet18_style_unfolded.onnx": _resnet,
    "bert_6l_384h.onnx": lambda: _bert(dynamic=False),
    "bert_6l_384h_dynamic.onnx": lambda: _bert(dynamic=True),
}

UNFOLDED = {"resnet18_style_unfolded.onnx"}


def export_torch(name: str, force: bool) -> None:
    import torch

    target = MODELS / name
    if target.exists() and not force:
        print(f"exists: {target}")
        return
    model, args, inputs, outputs, axes = TORCH_MODELS[name]()
    with torch.no_grad():
        torch.onnx.export(
            model,
            args,
            str(target),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=name not in UNFOLDED,
        )
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")


def fetch_ppocr(force: bool) -> None:
    if all((MODELS / n).exists() for n in PPOCR_FILES) and not force:
        print("exists: ppocr_*.onnx")
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("rapidocr_onnxruntime-*.whl"))
    if not wheels:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", RAPIDOCR, "-d", tmp],
                check=True,
            )
            (wheel,) = Path(tmp).glob("*.whl")
            wheels = [Path(wheel.replace(CACHE / wheel.name))]
    with zipfile.ZipFile(wheels[-1]) as z:
        for name, member in PPOCR_FILES.items():
            (MODELS / name).write_bytes(z.read(member))
            print(f"wrote {MODELS / name} (from {wheels[-1].name}:{member})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model file names to build (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild existing files")
    args = parser.parse_args(argv)
    MODELS.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or [*TORCH_MODELS, *PPOCR_FILES])
    for name in TORCH_MODELS:
        if name in wanted:
            export_torch(name, args.force)
    if wanted & set(PPOCR_FILES):
        fetch_ppocr(args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
