"""Quantization core: primitives (quantize/dequantize/fake_quant), observers, packing, modules."""
