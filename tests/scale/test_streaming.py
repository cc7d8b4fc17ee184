"""Issue 23 on the CPU: a GPTQ run of tinyllama-fm interrupted after a finished block and resumed from its
block checkpoints gives the same file as an uninterrupted run, byte for byte; checkpoints of another run are
refused with one line; and streaming the blocks through a device leaves the result unchanged (the CUDA case
runs on the GPU machine only)."""

import hashlib

import pytest
import torch

from slimtorch.calib.data import calibration_set
from slimtorch.errors import SlimError
from slimtorch.export.block_checkpoint import BlockCheckpoints, calib_digest
from slimtorch.export.quantized import save_quantized
from slimtorch.quantize import quantize_
from slimtorch.sequential import Stream
from slimtorch.zoo import load_model

RECIPE = "W4A16-g128"


class Interrupted(Exception):
    pass


class StopAfter(BlockCheckpoints):
    """Saves as usual, then stops the run once block ``last`` is saved (a job killed between blocks)."""

    def __init__(self, folder, key, last):
        super().__init__(folder, key)
        self.last = last

    def save(self, index, block):
        super().save(index, block)
        if index == self.last:
            raise Interrupted


@pytest.fixture(scope="module")
def setup():
    fp = load_model("tinyllama-fm")
    calib = calibration_set("tinyllama-fm", 8, model=fp)
    key = {"model": "tinyllama-fm", "recipe": RECIPE, "method": "gptq", "calib": calib_digest(calib)}
    return fp, calib, key


def quantized_file(model, path):
    save_quantized(model, path, base="tinyllama-fm")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fresh(fp):
    import copy

    return copy.deepcopy(fp)


def test_a_resumed_run_writes_the_same_file_as_an_uninterrupted_one(setup, tmp_path):
    fp, calib, key = setup
    whole = fresh(fp)
    quantize_(whole, RECIPE, calib, "gptq")
    want = quantized_file(whole, tmp_path / "whole.safetensors")

    folder = tmp_path / "blocks"
    with pytest.raises(Interrupted):
        quantize_(fresh(fp), RECIPE, calib, "gptq", stream=Stream(checkpoints=StopAfter(folder, key, last=2)))
    store = BlockCheckpoints(folder, key)
    assert store.done() == 3
    resumed = fresh(fp)
    solved = []
    original = store.save
    store.save = lambda i, b: (solved.append(i), original(i, b))  # only the unfinished blocks are solved again
    quantize_(resumed, RECIPE, calib, "gptq", stream=Stream(checkpoints=store))
    assert solved == list(range(3, len(resumed.model.layers)))
    assert quantized_file(resumed, tmp_path / "resumed.safetensors") == want


def test_checkpoints_of_another_run_are_refused(setup, tmp_path):
    fp, calib, key = setup
    folder = tmp_path / "blocks"
    with pytest.raises(Interrupted):
        quantize_(fresh(fp), RECIPE, calib, "gptq", stream=Stream(checkpoints=StopAfter(folder, key, last=0)))
    other = {**key, "recipe": "W8A16"}
    with pytest.raises(SlimError, match="another run"):
        BlockCheckpoints(folder, other)
    (folder / "block-00000.safetensors").write_bytes(b"\0" * 64)  # damaged: one line, not a traceback
    with pytest.raises(SlimError):
        quantize_(fresh(fp), RECIPE, calib, "gptq", stream=Stream(checkpoints=BlockCheckpoints(folder, {})))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming to a GPU needs one")
def test_streaming_blocks_through_the_gpu_equals_the_model_on_the_gpu(setup):
    fp, calib, _ = setup
    on_gpu = fresh(fp).cuda()
    quantize_(on_gpu, RECIPE, [tuple(t.cuda() for t in b) for b in calib], "gptq")
    streamed = fresh(fp)  # stays on the CPU; each block visits the GPU
    torch.cuda.reset_peak_memory_stats()
    quantize_(streamed, RECIPE, calib, "gptq", stream=Stream(device="cuda"))
    peak = torch.cuda.max_memory_allocated()
    assert next(streamed.parameters()).device.type == "cpu"
    a, b = on_gpu.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float().cpu(), b[k].float(), atol=0, rtol=0) or k.endswith("qweight") and \
            (a[k].cpu().int() - b[k].int()).abs().max() <= 1, k
    size = sum(t.numel() * t.element_size() for t in fp.state_dict().values())
    assert peak < size, (peak, size)
