import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the disk cache (slimtorch.io.cache) of this test session: shared by its subprocesses, gone afterwards,
# never the user's own
_CACHE = tempfile.mkdtemp(prefix="slimtorch-test-cache-")
atexit.register(shutil.rmtree, _CACHE, True)
os.environ["SLIMTORCH_CACHE_DIR"] = _CACHE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
