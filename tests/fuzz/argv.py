"""Hostile command lines: each command with options drawn from sound, careless and hostile values. Run in
this process through ``slimtorch.cli.main.main``: the outcome must be exit 0, or exit 2 with one line on
stderr; and the output folder must be absent or whole (``model.safetensors`` and ``report.json``), with
no staging folder left beside it."""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
from pathlib import Path

BAD_INTS = ["0", "-1", "-5", "99999999999999999999", "1e3", "nan", "", "٣", "0x10", "2**8", " 7", "3.5"]
BAD_FLOATS = ["nan", "inf", "-inf", "1e300", "-1", "0", "", "1e-320", "NaN", "x"]


def hostile_path(r: random.Random, work: Path) -> str:
    return r.choice(["/dev/zero", "/proc/slimtorch", "/proc/self/mem", "", "   ", str(work / "afile"),
                     str(work / "afile" / "sub"), str(work / "fifo"), str(work / "nonexistent" / "deep" / "x"),
                     str(work / "full"), "\x7f\u202e", "/", "." * 300, str(work / ("n" * 300))])


def _model(r: random.Random, work: Path) -> str:
    return r.choice(["fmnist-cnn", "fmnist-cnn", "fmnist-vit", "resnet50", "", "FMNIST-CNN", str(work / "full"),
                     str(work / "afile"), "/dev/zero", "../..", "tinyllama-fm"])


def argv_sets(seed: int, n: int, work: Path) -> list[list[str]]:
    """``n`` argument lists; about one in seven is a sound, quick job."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        out_dir = str(work / f"o{i}")
        cmd = r.choice(["quantize", "quantize", "train-qat", "eval", "cost", "models", "bogus"])
        if r.random() < 0.15:
            out.append(_sound(cmd, r, out_dir))
            continue
        args = [cmd, _model(r, work)] if cmd not in ("models", "bogus") else [cmd]
        options = {
            "quantize": {"--preset": ["W8A8", "W4A16-g128", "W9", "", "w8a8"], "--recipe": None, "--method":
                         ["rtn", "gptq", "magic", ""], "--calib-samples": BAD_INTS, "--calib": None,
                         "--limit": BAD_INTS, "--seed": BAD_INTS, "--out": None},
            "train-qat": {"--method": ["lsq", "pact", "adabits", "x"], "--bits": ["4", "W4A8", "W9", "8/6/4/2", "0",
                          "W1A1", ""], "--epochs": BAD_INTS, "--lr": BAD_FLOATS, "--kd": BAD_FLOATS,
                          "--limit-train": BAD_INTS, "--limit": BAD_INTS, "--device": ["tpu", "cuda:9", "", "cpu"],
                          "--batch-size": BAD_INTS, "--width-lr": BAD_FLOATS, "--seed": BAD_INTS, "--out": None,
                          "--resume": [], "--first-last-bits": BAD_INTS},
            "eval": {"--limit": BAD_INTS, "--json": []},
            "cost": {"--preset": ["W8A8", "x"], "--hardware": ["h100", "tpu", ""], "--batch": BAD_INTS,
                     "--tokens": BAD_INTS, "--context": BAD_INTS, "--plot": None, "--recipe": None},
            "models": {"--json": []}, "bogus": {"--x": []},
        }[cmd]
        for opt in r.sample(list(options), k=r.randint(1, len(options))):
            values = options[opt]
            if values == []:
                args.append(opt)
            elif values is None:
                args += [opt, out_dir if opt == "--out" and r.random() < 0.5 else hostile_path(r, work)]
            else:
                args += [opt, r.choice(values)]
        # a sound job must stay a quick one: a full evaluation or a 10-epoch training is not a hostile case
        for opt, value in {"eval": [("--limit", "16")], "quantize": [("--limit", "16")],
                           "train-qat": [("--limit", "16"), ("--limit-train", "64"), ("--epochs", "1")]}.get(cmd, []):
            if opt not in args:
                args += [opt, value]
        if r.random() < 0.2:
            args.append(r.choice(["--json", "--overwrite", "--frobnicate", "extra-arg"]))
        out.append(args)
    return out


def _sound(cmd: str, r: random.Random, out_dir: str) -> list[str]:
    if cmd == "quantize":
        return ["quantize", "fmnist-cnn", "--preset", r.choice(["W8A8", "W4A16-g128"]), "--limit", "32",
                "--calib-samples", "64", "--out", out_dir] + (["--json"] if r.random() < 0.5 else [])
    if cmd == "train-qat":
        return ["train-qat", "fmnist-cnn", "--epochs", "1", "--limit-train", "128", "--limit", "32", "--device", "cpu",
                "--out", out_dir]
    if cmd == "cost":
        return ["cost", "fmnist-cnn", "--json"]
    return ["eval", "fmnist-cnn", "--limit", "32"]


def prepare_work(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "afile").write_text("x")
    (work / "full").mkdir(exist_ok=True)
    (work / "full" / "keep.txt").write_text("mine")
    if not (work / "fifo").exists():
        os.mkfifo(work / "fifo")


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the CLI run in this process; its SIGTERM handler is undone after."""
    from slimtorch.cli.main import main

    old = signal.getsignal(signal.SIGTERM)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(list(argv))
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        signal.signal(signal.SIGTERM, old)
    return code, stdout.getvalue(), stderr.getvalue()


def run_argv(argv: list[str], work: Path) -> str:
    """'ok' (exit 0) or 'refused' (exit 2 and one line); AssertionError otherwise, or when the output
    folder is partial or a staging folder is left."""
    before = set(os.listdir(work))
    code, _, err = run_in_process(argv)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("slimtorch: error: "), f"exit 2 but stderr {err[-500:]!r}"
    else:
        assert code == 0, f"exit {code}: {err[-500:]!r}"
    assert (work / "full" / "keep.txt").read_text() == "mine", "an existing folder was changed"
    for name in set(os.listdir(work)) - before:
        p = work / name
        if name.startswith("."):
            assert name.endswith(".partial") and any(f.is_file() for f in p.rglob("*")), f"staging left: {name}"
        elif p.is_dir():
            files = {f.name for f in p.iterdir()}
            assert {"model.safetensors", "report.json"} <= files, f"partial output folder {name}: {sorted(files)}"
    return "ok" if code == 0 else "refused"
