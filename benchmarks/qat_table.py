"""Print the latest QAT records (benchmarks/results/qat.jsonl) as a Markdown table (the README's table).

    python benchmarks/qat_table.py
"""

from pathlib import Path

from records import latest

RESULTS = Path(__file__).parent / "results" / "qat.jsonl"
ORDER = ["rtn", "lsq", "pact", "sat", "adabits", "fracbits", "sensitivity", "f8net", "sign", "adabin",
         "lsq-digital", "lsq-on-pim", "pim-qat"]


def _detail(r: dict) -> str:
    if r["method"] == "f8net":
        return (f"integer-only forward: {r['integer_equal_rows']}/{r['integer_rows']} test images with logits equal "
                f"to the fake-quant ones (max diff {r['integer_max_lsb_diff']:g} LSB)")
    if r["method"] in ("fracbits", "sensitivity"):
        inner = list(r["layer_bits"].values())[1:-1]  # the plan's order: first and last layers stay at 8 bits
        lr = f"width lr {_width_lr(r)}; " if r["method"] == "fracbits" else ""
        return f"{lr}weight bits {'/'.join(map(str, inner))}, average {r['w_bits']:.2f}; `plans/{r['plan_file']}`"
    no_bn = r.get("pim", {}).get("bn_layers") == 0  # the ViT: nothing to calibrate
    if r["method"] == "lsq-on-pim":
        return (f"the digital LSQ model on the simulated PIM ({r['pim']['adc_bits']}-bit ADC, {r['pim']['rows']} rows)"
                + ("" if no_bn else f"; with BN calibration {r['top1_bn_calibrated']:.2f}"))
    if r["method"] == "pim-qat":
        return (f"{r['pim']['adc_bits']}-bit ADC; gap to digital {r['gap_to_digital']:.2f}"
                + ("" if no_bn else f"; before BN calibration {r['top1_before_bn_calibration']:.2f}"))
    if r["method"] == "adabits":
        return f"one model for widths {'/'.join(map(str, r['widths']))}"
    return ""


def _width_lr(r: dict):
    """FracBits' width lr (records before it was an option trained the widths with Adam: "adam")."""
    return r.get("config", {}).get("width_lr") or "adam"


def _variant(r: dict):
    """What else tells runs of one method apart: FracBits' width lr, the PIM ADC's bits."""
    if r["method"] == "fracbits":
        return _width_lr(r)
    return r["pim"]["adc_bits"] if "pim" in r else None


def main() -> None:
    records = latest(RESULTS, ("model", "method", "bits"), _variant)
    records = {k: r for k, r in records.items() if k[3] != "adam"}  # superseded: FracBits widths under Adam
    print("| model | method | bits | epochs | FP top-1 | top-1 | delta | notes |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for (model, method, bits, _), r in sorted(records.items(), key=lambda kv: (kv[0][0], ORDER.index(kv[0][1]),
                                                                              -float(kv[1]["w_bits"]),
                                                                              -(kv[0][3] if "pim" in kv[1] else 0))):
        epochs = r.get("config", {}).get("epochs", "")
        print(f"| {model} | {method} | {bits} | {epochs} | {r['fp_top1']:.2f} | {r['top1']:.2f} | "
              f"{r['delta']:+.2f} | {_detail(r)} |")


if __name__ == "__main__":
    main()
