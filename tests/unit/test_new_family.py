"""The worked example of docs/ARCHITECTURE.md, run as written there: a new family is one config, one
handler and one file, and apply_ dispatches to it."""

import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.api import _HANDLERS, apply_, families
from slimtorch.errors import SlimError

DOC = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


@pytest.fixture()
def bf16_family():
    """The example's module, built from the doc's code block (its handler registered), then unregistered."""
    code = re.search(r"```python\n(# slimtorch/bf16\.py\n.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("slimtorch_example_bf16")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    yield module
    del _HANDLERS[module.BF16Config]


def test_the_worked_example_is_a_family_apply_dispatches_to(bf16_family):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ref = [m.weight.detach().clone() for m in (model[0], model[2])]
    x = torch.randn(8, 16)
    report = apply_(model, bf16_family.BF16Config(skip=("2",)))
    assert families()["bf16"] is bf16_family.BF16Config
    assert report.family == "bf16" and report.layers == ["0"] and report.seconds > 0
    # layer 0 holds exactly the bf16 values of its weight; layer 2 was skipped
    assert torch.equal(model[0].weight, ref[0].to(torch.bfloat16).float()) and torch.equal(model[2].weight, ref[1])
    assert not torch.equal(model[0].weight, ref[0])
    want = nn.functional.linear(torch.relu(nn.functional.linear(x, ref[0].bfloat16().float(), model[0].bias)),
                                ref[1], model[2].bias)
    torch.testing.assert_close(model(x), want)


def test_slimtorch_apply_is_the_entry_point_and_import_slimtorch_stays_light():
    import subprocess
    import sys

    import slimtorch

    assert slimtorch.apply_ is apply_
    code = "import sys, slimtorch; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_apply_refuses_what_is_not_a_config_in_one_line():
    with pytest.raises(SlimError, match="dict is not a compression config"):
        apply_(nn.Linear(2, 2), {"method": "rtn"})
