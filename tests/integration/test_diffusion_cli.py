"""``slimtorch diffusion sample|eval``: a grid and a report from a weights file; every bad input one line, exit 2."""

import json

import torch

from slimtorch.diffusion.dit import DiT
from slimtorch.io.checkpoint import save_tensors
from tests.integration.clitools import one_line_error, run


def _weights(tmp_path):
    torch.manual_seed(0)
    cfg = {"dim": 64, "depth": 2, "heads": 2}
    path = tmp_path / "fmnist-dit.safetensors"
    save_tensors(path, {k: v.half() for k, v in DiT(**cfg).state_dict().items()}, {"config": cfg})
    return path


def test_sample_and_eval(tmp_path):
    w = _weights(tmp_path)
    r = run("diffusion", "sample", str(w), "--out", str(tmp_path / "s"), "--samples", "12", "--steps", "3",
            "--cache", "2")
    assert r.returncode == 0, r.stderr
    assert "12 samples, 3 ddim steps" in r.stdout
    assert (tmp_path / "s" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["samples"] == 12 and rep["cache_interval"] == 2 and rep["samples_per_s"] > 0
    cost = rep["modelled_cost"]  # traced from one cached run: fewer layer calls than steps x all layers
    assert "not a measurement" in cost["note"] and cost["flops"] > 0 and cost["layer_calls_per_sample"] > 0
    r = run("diffusion", "eval", str(w), "--out", str(tmp_path / "e"), "--samples", "20", "--steps", "2",
            "--sampler", "dpmpp-2m", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["fid_fmnist"] > 0 and 0 <= res["class_accuracy"] <= 1  # an untrained model: far from the data


def test_bad_inputs_are_one_line_exit_2(tmp_path):
    w = _weights(tmp_path)
    bad = tmp_path / "fmnist-dit-broken.safetensors"
    bad.write_bytes(b"\x00" * 100)
    for args, text in (((str(tmp_path / "fmnist-dit-none.safetensors"),), "does not exist"),
                       ((str(w), "--sampler", "euler"), "unknown sampler"),
                       ((str(w), "--steps", "0"), "--steps must be"),
                       ((str(w), "--steps", "3", "--cache", "9"), "--cache"),
                       ((str(bad),), str(bad.name)),
                       ((str(tmp_path / "other.safetensors"),), "not a diffusion model file")):
        one_line_error(run("diffusion", "sample", *args, "--out", str(tmp_path / "x")), text)
