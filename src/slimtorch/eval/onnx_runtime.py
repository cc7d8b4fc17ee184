"""Run an ONNX file in ONNX Runtime on the CPU as if it were the PyTorch model it was exported from, so
that the evaluation harness measures it on the same data with the same metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtorch.errors import SlimError


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` with every graph optimisation on (the QDQ fusions into integer
    kernels among them), on ``threads`` threads (default: as many as PyTorch uses)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SlimError("running ONNX models needs onnxruntime: pip install onnxruntime") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No busy-waiting between calls: a spinning pool would take the cores from whatever runs next (the other
    # runtime in an interleaved timing, or the PyTorch model in the same process).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise SlimError(f"ONNX Runtime cannot load {path}: {' '.join(str(exc).split())[:300]}") from None


class OnnxModel(nn.Module):
    """``forward(*tensors) -> tensor`` through an ONNX Runtime session (inputs in the order they were
    exported). ``tokenizer``: kept for models whose evaluation tokenizes text (sentence encoders)."""

    def __init__(self, path: Path, tokenizer=None, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = tokenizer

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        feed = {n: np.ascontiguousarray(a.detach().cpu().numpy()) for n, a in zip(self.input_names, args)}
        return torch.from_numpy(self.session.run(None, feed)[0])


class OnnxSentenceEncoder(OnnxModel):
    """A sentence encoder exported with ``(input_ids, attention_mask)`` inputs; ``encode`` as the zoo's."""

    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        from slimtorch.zoo.minilm import SentenceEncoder

        return SentenceEncoder.encode(self, sentences, batch_size)
