"""Quantization building blocks shared by the quantize-* and fold-qdq passes.

`dsopt.quant.grid`: integer grids, scales, rounding, block-wise quantization and bit packing.
`dsopt.quant.calibration`: calibration data and streaming range observers.
"""
