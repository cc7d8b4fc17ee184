"""Hostile and careless command lines: every mistake is one line on stderr and exit 2, found before any
work (no model loaded, no folder left behind); --json errors are a JSON object on stdout; interrupted runs
leave the previous output or the complete new one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fuzz.argv import run_in_process


def cli(*argv: str, capsys=None) -> tuple[int, str, str]:
    """Run the CLI in this process (fast)."""
    return run_in_process(list(argv))


def one_line(code: int, err: str, text: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and text in lines[0] and "Traceback" not in err, (code, err)


def run(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtorch", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def popen(*args: str) -> subprocess.Popen:
    """The CLI as a child process with SIGINT at its default: a shell that starts jobs in the background
    (CI's, say) hands them SIGINT ignored, and Python then never turns it into KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, "-m", "slimtorch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def started(proc: subprocess.Popen, timeout: float = 30) -> subprocess.Popen:
    """``proc`` once slimtorch's code catches SIGTERM (read from /proc): before that the interpreter is still
    starting, no slimtorch code has run, and a signal gets Python's (or the kernel's) default handling."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            fields = {}
        if int(fields.get("SigCgt", "0").strip() or "0", 16) & (1 << (signal.SIGTERM - 1)):
            return proc
        time.sleep(0.005)
    return proc


Q = ("quantize", "fmnist-cnn", "--preset", "W8A8")
T = ("train-qat", "fmnist-cnn", "--epochs", "1")


@pytest.mark.parametrize("argv, text", [
    ((*Q, "--out", "{o}", "--calib-samples", "99999999999999999999"), "--calib-samples"),
    ((*Q, "--out", "{o}", "--calib-samples", "0"), "--calib-samples"),
    ((*Q, "--out", "{o}", "--calib", "/dev/zero"), "not a regular file"),
    ((*Q, "--out", "{o}", "--calib", "{tmp}"), "class"),  # a vision model reads class folders of images
    ((*Q, "--out", "{o}", "--seed", "99999999999999999999"), "--seed"),
    ((*Q, "--out", "{o}", "--seed", "-1"), "--seed"),
    ((*Q, "--out", "{o}", "--limit", "0"), "--limit"),
    ((*Q, "--out", "{o}", "--method", "magic"), "--method"),
    ((*Q, "--out", "/proc/slimtorch-out"), "cannot write"),
    ((*Q, "--out", "{file}/sub"), "which is a file"),
    ((*Q, "--out", "{file}"), "is a file"),
    ((*Q, "--out", ""), "--out is empty"),
    ((*Q, "--out", "{full}"), "not empty"),
    (("quantize", "", "--preset", "W8A8", "--out", "{o}"), "model name is empty"),
    (("eval", ""), "model name is empty"),
    (("eval", "fmnist-cnn", "--limit", "-3"), "--limit"),
    ((*T, "--out", "{o}", "--lr", "nan"), "learning rate"),
    ((*T, "--out", "{o}", "--lr", "inf"), "learning rate"),
    ((*T, "--out", "{o}", "--lr", "1e300"), "learning rate"),
    ((*T, "--out", "{o}", "--lr", "-1"), "learning rate"),
    ((*T, "--out", "{o}", "--limit-train", "0"), "--limit-train"),
    ((*T, "--out", "{o}", "--limit-train", "-5"), "--limit-train"),
    ((*T, "--out", "{o}", "--limit", "0"), "--limit"),
    ((*T, "--out", "{o}", "--seed", "99999999999999999999"), "seed"),
    ((*T, "--out", "{o}", "--device", "tpu"), "--device"),
    ((*T, "--out", "{o}", "--kd", "nan"), "kd"),
    ((*T, "--out", "{o}", "--epochs", "0"), "epochs"),
    ((*T, "--out", "{o}", "--batch-size", "0"), "batch size"),
    ((*T, "--out", "{o}", "--bits", "W9A9"), "2 to 8"),
    ((*T, "--out", "{o}", "--resume"), "no checkpoint"),
    ((*T, "--out", "/proc/slimtorch-out"), "cannot write"),
    (("cost", "fmnist-cnn", "--plot", "/proc/slimtorch.png"), "cannot write"),
    (("cost", "fmnist-cnn", "--plot", "{file}/x.png"), "cannot write"),
    (("cost", "fmnist-cnn", "--batch", "0"), "--batch"),
    (("quantize", "fmnist-cnn"), "Missing option"),
    (("quantize",), "Missing argument"),
    (("eval", "fmnist-cnn", "--limit", "many"), "Invalid value"),
    (("eval", "fmnist-cnn", "--frobnicate"), "No such option"),
    (("frobnicate",), "No such command"),
])
def test_bad_arguments_are_one_line_before_any_work(argv, text, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    subs = {"{o}": str(tmp_path / "o"), "{file}": str(afile), "{tmp}": str(tmp_path), "{full}": str(full)}
    argv = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    t0 = time.perf_counter()
    code, out, err = cli(*argv, capsys=capsys)
    one_line(code, err, text)
    assert time.perf_counter() - t0 < 10  # found before any model was evaluated or trained
    assert not (tmp_path / "o").exists() and (full / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full"]  # no staging folder left behind


def test_more_calibration_samples_than_exist_is_one_line(tmp_path, capsys):
    code, _, err = cli(*Q, "--out", str(tmp_path / "o"), "--calib-samples", "70000", capsys=capsys)
    one_line(code, err, "only 60,000 Fashion-MNIST training images")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_a_fifo_as_calib_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = run("quantize", "tinyllama-fm", "--preset", "W8A8", "--calib", str(fifo), "--out", str(tmp_path / "o"),
            timeout=30)
    one_line(r.returncode, r.stderr, "not a regular file")


def test_json_errors_are_a_json_object_on_stdout(tmp_path, capsys):
    code, out, err = cli("eval", "resnet50", "--json", capsys=capsys)
    one_line(code, err, "unknown model")
    assert json.loads(out) == {"error": err.strip().removeprefix("slimtorch: error: "), "exit_code": 2}


def test_json_reports_are_strict_json():
    from slimtorch.io.json_text import json_text

    text = json_text({"ppl": float("inf"), "x": [float("nan"), 1.5], "n": 3})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"ppl": None, "x": [None, 1.5], "n": 3}


def test_overwrite_replaces_and_files_follow_the_umask(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    r = run(*Q, "--out", str(out), "--limit", "100", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.html", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, out / "model.safetensors", out / "report.json", out / "report.html"):
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


def _interrupt_once(tmp_path: Path, sig: int, delay: float, old_report: str) -> str:
    out = tmp_path / "o"
    proc = started(popen(*Q, "--out", str(out), "--limit", "3000", "--overwrite"))
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    expected = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}[sig]
    done = proc.returncode in (0, -sig)  # the job had ended: exit 0, or killed while Python shut down
    if not done:
        assert (proc.returncode, err.strip()) == (expected[0], f"slimtorch: error: {expected[1]}"), err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["o"], left  # no staging or old folder left behind
    names = sorted(p.name for p in out.iterdir())
    assert names == ["model.safetensors", "report.html", "report.json"], names
    report = (out / "report.json").read_text()
    if report == old_report:
        assert not done, f"exit {proc.returncode} without the new output"
        return "old"
    from slimtorch.export.quantized import load_quantized

    assert json.loads(report)["limit"] == 3000
    load_quantized(out / "model.safetensors")  # whole: its checksum holds
    return "new"


def _previous_output(tmp_path: Path) -> str:
    r = run(*Q, "--out", str(tmp_path / "o"), "--limit", "50")
    assert r.returncode == 0, r.stderr
    return (tmp_path / "o" / "report.json").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_the_previous_output_whole(tmp_path, sig):
    old = _previous_output(tmp_path)
    assert _interrupt_once(tmp_path, sig, 3.0, old) == "old"


@pytest.mark.slow
def test_interrupts_at_random_moments_leave_old_or_new_never_a_mix(tmp_path):
    old = _previous_output(tmp_path)
    rng = random.Random(0)
    seen = []
    for i in range(12):
        seen.append(_interrupt_once(tmp_path, rng.choice([signal.SIGINT, signal.SIGTERM]), rng.uniform(0.0, 14), old))
        if seen[-1] == "new":
            old = (tmp_path / "o" / "report.json").read_text()
    assert "old" in seen


@pytest.mark.slow
def test_an_interrupted_training_leaves_no_output_and_resumes_from_its_staging_folder(tmp_path):
    out = tmp_path / "o"
    args = [*T[:2], "--epochs", "3", "--limit-train", "12000", "--batch-size", "128", "--limit", "200",
            "--device", "cpu", "--out", str(out)]
    proc = popen(*args)
    ckpt = tmp_path / ".o.partial" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300  # only bounds a hang: an epoch takes 20-40 s alone, minutes on a loaded machine
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("training finished before the signal")  # the machine was faster than the poll
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "slimtorch: error: terminated", err
    assert not out.exists() and ckpt.is_file()
    r = run(*args, "--resume", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    epochs = [h["epoch"] for h in json.loads(r.stdout)["training"]["history"]]
    assert epochs == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.slow
def test_an_interrupted_gptq_run_resumes_from_its_finished_blocks_to_the_same_file(tmp_path):
    import hashlib

    args = ["quantize", "tinyllama-fm", "--preset", "W4A16-g128", "--method", "gptq", "--calib-samples", "16",
            "--limit", "16"]
    whole = run(*args, "--out", str(tmp_path / "whole"), timeout=300)
    assert whole.returncode == 0, whole.stderr
    want = hashlib.sha256((tmp_path / "whole" / "model.safetensors").read_bytes()).hexdigest()
    out = tmp_path / "o"
    r = run(*args, "--out", str(out), "--resume")  # nothing to resume yet: one line
    assert r.returncode == 2 and "no finished blocks" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    proc = popen(*args, "--out", str(out))
    second = tmp_path / ".o.partial" / "blocks" / "block-00001.safetensors"
    deadline = time.time() + 300
    while not second.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("quantization finished before the signal")
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "slimtorch: error: terminated", err
    assert not out.exists() and second.is_file()
    r = run(*args, "--out", str(out), "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    from slimtorch.io.checkpoint import load_tensors

    a, ma = load_tensors(tmp_path / "whole" / "model.safetensors")
    b, mb = load_tensors(out / "model.safetensors")
    assert {k: v for k, v in ma.items() if v != mb.get(k)} == {}
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "whole"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.html", "report.json"]


def test_a_signal_during_start_up_is_one_line_not_a_broken_import():
    """Before: Ctrl-C 0.3 s after start gave "module 'numpy' has no attribute 'multiply'" (an import
    interrupted halfway), or a run that went on; the imports now run with the signals held."""
    for i, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)):  # from the moment our handler is in
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        proc = started(popen("eval", "fmnist-cnn", "--limit", "5000"))  # seconds of work: not done at 1 s
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        want = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}[sig]
        assert (proc.returncode, err.strip()) == (want[0], f"slimtorch: error: {want[1]}"), (delay, err)


def test_a_signal_during_a_lazy_import_waits_for_the_import(tmp_path, monkeypatch):
    """Before: SIGTERM raised inside a pybind11 extension's initialisation became "ImportError: initialization
    failed" plus a fatal GIL error at exit. Now the module's import runs to its end, then Terminated comes."""
    import importlib
    import sys

    from slimtorch.cli.signals import Terminated, on_sigterm

    (tmp_path / "slow_mod_for_signal_test.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "t0 = time.time()\n"
        "while time.time() - t0 < 0.3:\n"
        "    sum(range(1000))\n"
        "DONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with pytest.raises(Terminated):
            mod = importlib.import_module("slow_mod_for_signal_test")
            assert mod.DONE
            t0 = time.time()
            while time.time() - t0 < 5:  # the signal comes again 50 ms after the import
                time.sleep(0.01)
        assert sys.modules["slow_mod_for_signal_test"].DONE
    finally:
        signal.signal(signal.SIGTERM, old)
        sys.modules.pop("slow_mod_for_signal_test", None)


def test_calibration_text_is_cut_at_line_ends_into_bounded_pieces():
    from slimtorch.calib.data import text_pieces

    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(5000))
    pieces = text_pieces(text, size=1000)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces) and max(map(len, pieces)) < 1000 + 60
    assert text_pieces("short\ntext", size=1000) == ["short\ntext"]  # small files: one piece, as before


def test_a_calibration_text_over_the_cap_is_refused_before_reading(tmp_path, capsys):
    from slimtorch.calib.data import MAX_TEXT_BYTES

    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)  # sparse: nothing is written, nothing should be read
    code, _, err = cli("quantize", "tinyllama-fm", "--preset", "W8A8", "--calib", str(big), "--out",
                       str(tmp_path / "o"), capsys=capsys)
    one_line(code, err, "at most 67,108,864 are read")


@pytest.mark.slow
def test_a_large_calibration_text_stays_within_memory(tmp_path):
    """Before: a 32 MB text took 5.0 GB while the tokenizer encoded it in one call; in pieces 0.5 GB."""
    text = tmp_path / "big.txt"
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "range", "print", "the", "None"]
    with open(text, "w") as f:
        for _ in range(400_000):  # about 24 MB
            f.write(" ".join(rng.choice(words) for _ in range(12)) + "\n")
    code = ("import resource; from slimtorch.calib.data import calibration_set; from slimtorch.zoo import load_model; "
            f"calibration_set('tinyllama-fm', 128, model=load_model('tinyllama-fm'), data_file={str(text)!r}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 1_200_000  # KiB: torch and the model alone take about 0.4 GB


def test_a_signal_during_interpreter_shutdown_is_not_a_traceback():
    """A SIGTERM that arrives after the job is over, while Python runs its exit hooks (seen in the random
    interrupt test: during weakref.finalize's hook), ends the process quietly by the signal's default action."""
    script = ("import atexit, os, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(2)))\n"
              "sys.argv = ['slimtorch', 'models', '--json']\n"
              "from slimtorch.cli.entry import main\n"
              "main()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert json.loads(r.stdout)["fmnist-cnn"]["params"] > 0  # the job itself finished
    assert r.returncode == -signal.SIGTERM and r.stderr == "", (r.returncode, r.stderr)
