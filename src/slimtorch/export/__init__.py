"""Model formats out: our quantize format (quantized.py); standard formats (compressed-tensors, ONNX) next."""
