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
        inner = [b for n, b in r["layer_bits"].items() if b != 8 or n not in ("stem.0", "fc")]
        return f"weight bits {'/'.join(map(str, inner))}, average {r['w_bits']:.2f}; plan in results/plans/"
    if r["method"] == "lsq-on-pim":
        return (f"the digital LSQ model on the simulated PIM ({r['pim']['adc_bits']}-bit ADC, {r['pim']['rows']} rows);"
                f" with BN calibration {r['top1_bn_calibrated']:.2f}")
    if r["method"] == "pim-qat":
        return f"gap to digital {r['gap_to_digital']:.2f}; before BN calibration {r['top1_before_bn_calibration']:.2f}"
    if r["method"] == "adabits":
        return f"one model for widths {'/'.join(map(str, r['widths']))}"
    return ""


def main() -> None:
    records = latest(RESULTS, ("model", "method", "bits"))
    print("| model | method | bits | epochs | FP top-1 | top-1 | delta | notes |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for (model, method, bits), r in sorted(records.items(), key=lambda kv: (kv[0][0], ORDER.index(kv[0][1]),
                                                                              -float(kv[1]["w_bits"]))):
        epochs = r.get("config", {}).get("epochs", "")
        print(f"| {model} | {method} | {bits} | {epochs} | {r['fp_top1']:.2f} | {r['top1']:.2f} | "
              f"{r['delta']:+.2f} | {_detail(r)} |")


if __name__ == "__main__":
    main()
