"""Every QAT method of the registry, prepared through apply_ and exported by its method object: what it
exports computes what the trained student computed, and survives its save format."""

import copy

import pytest
import torch

from slimtorch.api import apply_
from slimtorch.export.quantized import load_quantized, save_quantized
from slimtorch.io.checkpoint import load_tensors
from slimtorch.qat.adabits import set_bits
from slimtorch.qat.methods import QAT_METHODS, ExportContext, QATConfig
from slimtorch.zoo import load_model

BITS = {"adabits": "8/4", "f8net": "8", "adabin": "1", "fracbits": "W3A8"}
EXACT = ("lsq", "pact", "sat", "f8net", "adabin")  # the export computes the student's own function


@pytest.fixture(scope="module")
def fp():
    return load_model("fmnist-cnn")


@pytest.mark.parametrize("name", list(QAT_METHODS))
def test_every_qat_method_prepares_through_apply_and_exports_what_it_trained(name, fp, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28)
    method = QAT_METHODS[name]
    bits = method.bits(BITS.get(name, "W4A4"))
    report = apply_(copy.deepcopy(fp), QATConfig(name, bits, epochs=2), [(x,)])
    student, plan = report.student.model, report.plan
    assert report.family == "qat" and (bool(plan) == method.uses_plan)
    student.train()
    for switch in report.student.train.get("variants") or [None]:  # one step's forward/backward per width
        if switch:
            switch(student)
        if report.student.train.get("on_epoch"):
            report.student.train["on_epoch"](student, 0, 2)
        student(x).sum().backward()  # the first batch sets the learned steps and ranges
    student.eval()
    with torch.no_grad():
        want = {b: (set_bits(student, b), student(x))[1] for b in bits.widths} if name == "adabits" else student(x)
    ctx = ExportContext(tmp_path, "fmnist-cnn", x, dict(report.student.extra))
    exports = method.export(student, plan, bits, ctx)
    assert exports and sum(e.primary for e in exports) == 1
    for e in exports:
        path = tmp_path / f"{e.folder or 'm'}.safetensors"
        with torch.no_grad():
            got = e.model.eval()(x)
            if name in EXACT:
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            elif name == "adabits":
                torch.testing.assert_close(got, want[e.fields["width"]], atol=1e-4, rtol=1e-4)
            if e.save is None:  # the quantize format: loads back to the same outputs
                save_quantized(e.model, path, base="fmnist-cnn")
                back, _ = load_quantized(path)
                assert torch.equal(back(x), got)
            else:  # the method's state dict
                e.save(e.model, path)
                saved, meta = load_tensors(path)
                assert meta["method"] == name and saved.keys() == e.model.state_dict().keys()
                assert all(torch.equal(saved[k], v) for k, v in e.model.state_dict().items())
    if name == "fracbits":  # hard widths, averaging the target over the inner layers, and the Plan saved
        inner = [b for n, b in ctx.extra["layer_bits"].items() if plan[n].weight.bits != 8]
        assert set(inner) <= {2, 3, 4} and (tmp_path / "plan.json").is_file()
    if name == "pim":
        assert ctx.extra["pim"]["bn_layers_calibrated"] > 0 and ctx.extra["pim"]["adc_bits"] == 6
