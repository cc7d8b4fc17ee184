"""`slimtorch export` and report.html, end to end through the CLI."""

import json
import re
import shutil
import subprocess

import pytest
from clitools import one_line_error, run

from slimtorch.export.quantized import load_quantized


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "q"
    r = run("quantize", "fmnist-cnn", "--preset", "W8A8", "--out", str(out), "--limit", "1000")
    assert r.returncode == 0, r.stderr
    return out


def test_onnx_export_matches_our_accuracy_and_is_faster_than_fp_onnx(cnn_dir):
    pytest.importorskip("onnxruntime")
    r = run("export", str(cnn_dir), "--format", "onnx", "--batch", "1,64", "--limit", "1000", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (cnn_dir / "onnx" / "model.onnx").stat().st_size < 0.35 * (cnn_dir / "onnx" / "fp.onnx").stat().st_size
    acc = next(m for m in rep["metrics"] if m["name"] == "top1_accuracy")
    ours = json.loads((cnn_dir / "report.json").read_text())["metrics"][0]
    assert acc["pytorch_quantized"] == ours["quantized"] and acc["pytorch_fp"] == ours["fp"]  # same data
    assert abs(acc["onnx_fp"] - acc["pytorch_fp"]) < 1e-9
    assert abs(acc["onnx_int8"] - acc["pytorch_quantized"]) <= 0.3  # 1,000 images: 3 flips at most
    assert set(rep["latency"]) == {"1", "64"}
    for row in rep["latency"].values():
        assert row["onnx_int8"]["p10_ms"] <= row["onnx_int8"]["median_ms"] <= row["onnx_int8"]["p90_ms"]
    # speed is a benchmark record (benchmarks/cpu_runtime.py), not a timed test: only its presence here


def test_onnx_export_of_a_structured_pruning_gives_the_pruned_models_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    pruned = tmp_path / "p"
    r = run("prune", "fmnist-cnn", "--method", "structured", "--budget", "0.5", "--importance", "magnitude",
            "--limit", "300", "--calib-samples", "64", "--out", str(pruned))
    assert r.returncode == 0, r.stderr
    r = run("export", str(pruned), "--format", "onnx", "--batch", "1", "--limit", "300", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    acc = next(m for m in rep["metrics"] if m["name"] == "top1_accuracy")
    assert abs(acc["onnx_pruned"] - acc["pytorch_pruned"]) < 1e-9  # a float model: the same predictions
    assert abs(acc["onnx_fp"] - acc["pytorch_fp"]) < 1e-9
    assert (pruned / "onnx" / "model.onnx").stat().st_size < 0.8 * (pruned / "onnx" / "fp.onnx").stat().st_size
    assert "speedup_pruned_vs_onnx_fp" in rep["latency"]["1"] and rep["method"] == "structured"
    one_line_error(run("export", str(pruned), "--format", "hf", "--out", str(tmp_path / "h")), "pruned model")


def test_export_errors_are_one_line(tmp_path, cnn_dir):
    one_line_error(run("export", str(tmp_path), "--format", "onnx"), "holds no model.safetensors")
    one_line_error(run("export", str(cnn_dir), "--format", "tflite"), "is not one of: onnx, hf")
    one_line_error(run("export", str(cnn_dir), "--format", "hf", "--out", str(tmp_path / "h")), "language models")
    one_line_error(run("export", str(cnn_dir), "--format", "onnx", "--batch", "0"), "--batch")
    assert not (tmp_path / "h").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["W4A16-g128", "W8A8"])
def test_hf_export_reloads_in_transformers_with_our_perplexity(tmp_path, preset):
    pytest.importorskip("compressed_tensors")
    q = tmp_path / "q"
    r = run("quantize", "tinyllama-fm", "--preset", preset, "--out", str(q), "--limit", "16")
    assert r.returncode == 0, r.stderr
    r = run("export", str(q), "--format", "hf", "--limit", "16", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    cfg = json.loads((q / "hf" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["format"] == {"W4A16-g128": "pack-quantized", "W8A8": "int-quantized"}[preset]
    assert rep["reload_check"]["perplexity_relative_difference"] < 0.005
    if preset == "W4A16-g128":  # weight-only: the decompressed weights are ours, so the logits are too
        assert rep["reload_check"]["max_abs_logit_difference"] < 1e-3
    model, _ = load_quantized(q / "model.safetensors")  # the quantize output is untouched
    assert model is not None


def test_report_html_renders_in_chromium_with_its_figures(tmp_path, cnn_dir):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (make test installs it)")
    page = (cnn_dir / "report.html").read_text()
    assert "<script" not in page and "http" not in page.split("</head>")[0]  # self-contained, no code
    probe = tmp_path / "probe.html"  # the page plus a script that counts the images the browser decoded
    probe.write_text(page.replace("</body>", "<script>window.onload=()=>{document.body.dataset.decoded="
                                  "[...document.images].filter(i=>i.complete&&i.naturalWidth>100).length;}"
                                  "</script></body>"))
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert "fmnist-cnn W8A8 (rtn)" in dom, r.stderr[-500:]
    for section in ("Metrics", "Size", "Latency", "Per-layer error and bits", "Roofline (modelled, not measured)"):
        assert f"<h2>{section}</h2>" in dom
    ids = set(re.findall(r'<figure id="(fig-[a-z]+)"', dom))
    assert ids == {"fig-metrics", "fig-latency", "fig-layers", "fig-roofline"}
    assert re.search(r'data-decoded="(\d+)"', dom).group(1) == "4"
    report = json.loads((cnn_dir / "report.json").read_text())
    assert len(report["layers"]) == 10 and all(r["weight_bits"] == 8 for r in report["layers"])
    assert all(dom.count(f"<td>{r['name']}</td>") == 1 for r in report["layers"])
