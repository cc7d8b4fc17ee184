"""QAT methods as objects, and ``QATConfig``: the QAT family of ``apply_``.

Each method says how ``--bits`` reads for it, how a float model becomes its trainable student
(``prepare``: the model, the trainer's hooks), and how the trained student is saved (``export``: the
quantize format, or the method's own state dict). ``QAT_METHODS`` is the one registry: the CLI's
``--method`` choices and help, the job, the benchmark and the tests all read it.

``apply_(model, QATConfig(method, bits), calib)`` prepares ``model`` in place and returns a
``QATReport`` whose ``student`` is what to train (``slimtorch.distill.train_student``); for F8Net,
which rebuilds the network in fixed point, the student is a new module built from ``model``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from slimtorch.api import Report, handler
from slimtorch.errors import SlimError, shown
from slimtorch.io.checkpoint import save_tensors
from slimtorch.progress import Progress
from slimtorch.qat.adabin import binarize_cnn, set_ede
from slimtorch.qat.adabits import evaluate_widths, export_width, prepare_adabits, widths_variants
from slimtorch.qat.f8net import F8CNN
from slimtorch.qat.fracbits import FRACBITS_WIDTH_LR, final_plan, prepare_fracbits, save_plan, training_hooks
from slimtorch.qat.pim import PIMConfig, calibrate_bn, calibration_batches, to_pim
from slimtorch.qat.prepare import METHODS as QUANTIZERS
from slimtorch.qat.prepare import convert, prepare_qat, qat_plan
from slimtorch.quantize import weight_bits
from slimtorch.sequential import Batch
from slimtorch.spec import Plan


@dataclass(frozen=True)
class Bits:
    """Weight and input widths (``act`` None: weight-only); AdaBits' switchable ``widths``."""

    weight: int
    act: int | None
    widths: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"W{self.weight}" + (f"A{self.act}" if self.act else "A16")


def parse_bits(text: str) -> tuple[int, int | None]:
    """``4`` -> (4, 4); ``W4A8`` -> (4, 8); ``W4`` / ``W4A16`` -> (4, None): weight-only."""
    t = text.strip().upper()
    m = re.fullmatch(r"(\d{1,2})|W(\d{1,2})(?:A(\d{1,2}))?", t)
    if not m:
        raise SlimError(f"--bits {shown(text)}: write N (weights and inputs), WnAm, or Wn (weights only)")
    w = int(m.group(1) or m.group(2))
    a = w if m.group(1) else None if m.group(3) in (None, "16", "32") else int(m.group(3))
    if not all(2 <= b <= 8 for b in (w, a) if b is not None):
        raise SlimError(f"--bits {shown(text)}: widths are from 2 to 8 bits (inputs may also be 16 or 32: float)")
    return w, a


@dataclass
class Student:
    """A prepared model with what its training needs: keyword arguments of ``train_student``
    (``variants``, ``on_epoch``, ``penalty``), the widths' learning rate when the user gives none, and
    facts for the report (``extra``)."""

    model: nn.Module
    train: dict = field(default_factory=dict)
    width_lr: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Export:
    """One trained model to evaluate and save: in DIR, or in DIR/``folder``; ``save(model, path)`` for
    formats other than the quantize format; ``fields`` go into its report."""

    model: nn.Module
    label: str
    bits_per_weight: float
    folder: str = ""
    save: Callable[[nn.Module, Path], None] | None = None
    fields: dict = field(default_factory=dict)
    primary: bool = True  # the export whose report is DIR/report.json's


@dataclass
class ExportContext:
    """What ``export`` may need: the output folder, the zoo model's name, the training inputs, and the
    report facts gathered so far (``extra``, which export may add to)."""

    out: Path
    model_name: str
    x: torch.Tensor
    extra: dict


class QATMethod:
    """A QAT method. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for --help
    bits_help: ClassVar[str] = "N (weights and inputs), WnAm, or Wn (weights only)"
    models: ClassVar[tuple[str, ...] | None] = None  # the zoo models it is built for (None: any classifier)
    uses_plan: ClassVar[bool] = True
    state_format: ClassVar[bool] = False  # saves its state dict rather than the quantize format
    fixed_bits: ClassVar[int | None] = None  # methods of one width: weights and inputs at it, and why
    fixed_why: ClassVar[str] = ""

    def bits(self, text: str) -> Bits:
        if self.fixed_bits is not None:
            b = self.fixed_bits
            if text not in (str(b), f"W{b}A{b}"):
                raise SlimError(f"--method {self.name} {self.fixed_why}: use --bits {b}")
            return Bits(b, b)
        w, a = parse_bits(text)
        return Bits(w, a)

    def prepare(self, model: nn.Module, plan: Plan, bits: Bits, config: QATConfig) -> Student:
        raise NotImplementedError

    def evaluator(self, evaluate: Callable[[nn.Module], float], bits: Bits) -> Callable:
        """The per-epoch metric of training."""
        return evaluate

    def export(self, student: nn.Module, plan: Plan, bits: Bits, ctx: ExportContext) -> list[Export]:
        """The post-training modules and the quantize format (``convert``)."""
        q = convert(student)
        return [Export(q, f"QAT-{self.name}-{bits.label}", weight_bits(q))]

    def notes(self, bits: Bits, extra: dict) -> list[str]:
        return []

    def summary_fields(self, exports: list[Export], reports: list[dict]) -> dict:
        """Report fields that sum up several exports (AdaBits' widths)."""
        return {}


QAT_METHODS: dict[str, QATMethod] = {}


def register(method: type[QATMethod] | QATMethod):
    """Add a method (a QATMethod subclass, as a decorator, or an instance) to ``QAT_METHODS``."""
    obj = method() if isinstance(method, type) else method
    QAT_METHODS[obj.name] = obj
    return method


def get_method(name: str) -> QATMethod:
    if name not in QAT_METHODS:
        raise SlimError(f"unknown QAT method {shown(name)}; choose one of: {', '.join(QAT_METHODS)}")
    return QAT_METHODS[name]


class FakeQuantMethod(QATMethod):
    """LSQ, PACT, SAT: fake-quantized Linear/Conv2d layers (``prepare_qat`` with the quantizers of
    ``qat.prepare.METHODS[name]``)."""

    def __init__(self, name: str, summary: str) -> None:
        self.name, self.summary = name, summary

    def prepare(self, model, plan, bits, config):
        return Student(prepare_qat(model, plan, self.name))


register(FakeQuantMethod("lsq", "learned step sizes for weights and inputs (LSQ)"))
register(FakeQuantMethod("pact", "DoReFa weights, PACT-clipped inputs"))
register(FakeQuantMethod("sat", "DoReFa weights with SAT's rescaling, PACT inputs with its calibrated gradient"))


@register
class AdaBitsMethod(QATMethod):
    name, summary = "adabits", "one model that runs at several widths (AdaBits)"
    bits_help = "widths like 8/6/4/2"

    def bits(self, text):
        try:
            widths = tuple(int(b) for b in text.split("/"))
        except ValueError:
            raise SlimError(f"--bits {text!r}: adabits takes widths such as 8/6/4/2") from None
        if not widths or not all(2 <= b <= 8 for b in widths):
            raise SlimError(f"--bits {text!r}: adabits widths are from 2 to 8 bits")
        return Bits(min(widths), min(widths), widths)

    def prepare(self, model, plan, bits, config):
        return Student(prepare_adabits(model, plan, bits.widths), {"variants": widths_variants(bits.widths)})

    def evaluator(self, evaluate, bits):
        return evaluate_widths(evaluate, bits.widths)

    def export(self, student, plan, bits, ctx):
        widths = "/".join(map(str, bits.widths))
        out = []
        for b in bits.widths:
            q = export_width(copy.deepcopy(student), b)
            layers = {n: f"W:int{8 if p.weight.bits == 8 else b} A:{p.act.dtype if p.act else '-'}"
                      for n, p in plan.items()}
            out.append(Export(q, f"QAT-adabits-W{b}A{b}", weight_bits(q), folder=f"w{b}", primary=b == bits.weight,
                              fields={
                "width": b, "notes": [f"width {b} of one AdaBits model for widths {widths}; first and last layers "
                                      "at 8 bits"], "skipped_layers": {}, "quantized_layers": layers}))
        return out

    def summary_fields(self, exports, reports):
        return {"widths": {str(e.fields["width"]): {"metrics": r["metrics"], "folder": e.folder}
                           for e, r in zip(exports, reports)},
                "model_folder": next(e.folder for e in exports if e.primary)}

    def notes(self, bits, extra):
        return [f"one AdaBits model for widths {'/'.join(map(str, bits.widths))}: each width's model and report "
                "are in DIR/w<bits>/; this report is the lowest width's"]


@register
class FracBitsMethod(QATMethod):
    name, summary = "fracbits", "learned fractional widths under an average-width budget (FracBits)"
    bits_help = "the average weight width, e.g. W3A8"

    def prepare(self, model, plan, bits, config):
        hook, penalty = training_hooks(float(bits.weight), config.epochs)
        return Student(prepare_fracbits(model, plan, bits.weight + 0.5), {"on_epoch": hook, "penalty": penalty},
                       width_lr=FRACBITS_WIDTH_LR)

    def export(self, student, plan, bits, ctx):
        final = final_plan(student, plan, float(bits.weight))
        ctx.out.mkdir(parents=True, exist_ok=True)
        save_plan(ctx.out / "plan.json", final, {"model": ctx.model_name, "method": "fracbits", "target": bits.weight})
        ctx.extra["layer_bits"] = {n: p.weight.bits for n, p in final.items()}
        ctx.extra["plan_file"] = "plan.json"
        return super().export(student, plan, bits, ctx)

    def notes(self, bits, extra):
        return [f"FracBits widths after hard assignment: {extra.get('layer_bits')}; the Plan is DIR/plan.json"]


STATE_NOTE = "model.safetensors holds the trained model's state dict (not the quantize format)"


def save_state(q: nn.Module, path: Path, meta: dict) -> None:
    """Research models outside the quantize format (fixed point, binary, PIM): their state dict."""
    save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in q.state_dict().items()}, meta)


class _StateMethod(QATMethod):
    """Methods whose trained model is saved as its state dict."""

    state_format = True

    def export(self, student, plan, bits, ctx):
        student.eval()  # saved as it infers
        meta = {"model": ctx.model_name, "method": self.name, "format": f"slimtorch-{self.name}-state",
                **self.save_meta(student, ctx)}
        return [Export(student, f"QAT-{self.name}-{bits.label}", float(bits.weight), save=partial(save_state, meta=meta))]

    def save_meta(self, student: nn.Module, ctx: ExportContext) -> dict:
        return {}


@register
class F8NetMethod(_StateMethod):
    name, summary = "f8net", "8-bit fixed point with batch norm folded (F8Net)"
    bits_help, fixed_bits, fixed_why = "8", 8, "is 8-bit fixed point"
    models, uses_plan = ("fmnist-cnn",), False

    def prepare(self, model, plan, bits, config):
        return Student(F8CNN(model))

    def notes(self, bits, extra):
        return ["8-bit fixed point (F8Net) with batch norm folded; " + STATE_NOTE + ": load it into "
                "slimtorch.qat.f8net.F8CNN; integer_forward runs it with integers only"]


@register
class AdaBinMethod(_StateMethod):
    name, summary = "adabin", "binary weights and inputs with learned centres and spreads (AdaBin)"
    bits_help, fixed_bits, fixed_why = "1", 1, "binarizes weights and inputs"
    models, uses_plan = ("fmnist-cnn",), False

    def prepare(self, model, plan, bits, config):
        return Student(binarize_cnn(model, "adabin"), {"on_epoch": set_ede})

    def notes(self, bits, extra):
        return ["W1A1 (AdaBin) 3x3 convolutions in the residual blocks; stem, 1x1 shortcuts and classifier in "
                "float; " + STATE_NOTE + " (slimtorch.qat.adabin.binarize_cnn)"]


@register
class PIMMethod(_StateMethod):
    name, summary = "pim", "LSQ trained on a simulated processing-in-memory array (PIM-QAT)"

    def bits(self, text):
        b = super().bits(text)
        if b.act is None:
            raise SlimError("--method pim needs quantized inputs: --bits WnAm")
        return b

    def prepare(self, model, plan, bits, config):
        edges = (next(iter(plan)), list(plan)[-1])
        student = to_pim(prepare_qat(model, plan, "lsq"), config.pim, rescale=True, skip=edges)
        pim = {"rows": config.pim.rows, "adc_bits": config.pim.adc_bits, "scheme": "native",
               "digital_layers": list(edges)}
        return Student(student, extra={"pim": pim})

    def save_meta(self, student, ctx):
        calib = calibration_batches(ctx.x)
        ctx.extra["pim"]["bn_layers_calibrated"] = calibrate_bn(student, calib)
        ctx.extra["pim"]["bn_calibration_batches"] = len(calib)
        return {"pim": json.dumps(ctx.extra["pim"])}

    def notes(self, bits, extra):
        pim = extra.get("pim", {})
        return [f"accuracy on the simulated PIM array ({pim.get('adc_bits')}-bit ADC over {pim.get('rows')}-row "
                "partial sums; first and last layers digital)"
                + (", after BN calibration on the simulation; " if pim.get("bn_layers_calibrated")
                   else " (no BatchNorm to calibrate); ") + STATE_NOTE]


assert set(QUANTIZERS) <= set(QAT_METHODS), "every prepare_qat quantizer is a QAT method"


@dataclass(frozen=True)
class QATConfig:
    """Prepare a model for quantization-aware training by ``method`` (a key of ``QAT_METHODS``) at
    ``bits`` (as ``--bits`` reads for that method). ``plan``: which layers at which widths (None: every
    Linear/Conv2d in the order they run on the first calibration batch, the first and last at
    ``first_last_bits``). ``epochs``: the training length, for methods whose schedule depends on it."""

    method: str = "lsq"
    bits: str | Bits = "4"
    plan: Plan | None = None
    first_last_bits: int | None = 8
    epochs: int = 10
    pim: PIMConfig = PIMConfig(rows=64, adc_bits=6)

    def __post_init__(self) -> None:
        m = get_method(self.method)
        if isinstance(self.bits, str):
            object.__setattr__(self, "bits", m.bits(self.bits))


@dataclass(kw_only=True)
class QATReport(Report):
    method: str
    plan: Plan
    student: Student


@handler(QATConfig, "qat")
def _apply_qat(model: nn.Module, config: QATConfig, calib: list[Batch], progress: Progress) -> QATReport:
    method, bits = QAT_METHODS[config.method], config.bits
    plan = config.plan
    if plan is None and method.uses_plan:
        if not calib:
            raise SlimError(f"QAT by {method.name} plans its layers on a sample batch: give calibration data "
                            "or a plan")
        plan = qat_plan(model, bits.weight, bits.act, calib[0], config.first_last_bits)
    student = method.prepare(model, plan or {}, bits, config)
    return QATReport(method=method.name, plan=plan or {}, student=student)
