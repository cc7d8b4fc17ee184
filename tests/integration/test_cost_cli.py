import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtorch", *args], capture_output=True, text=True, timeout=600)


def test_cost_json_and_plot(tmp_path):
    png = tmp_path / "roof.png"
    r = run("cost", "fmnist-cnn", "--preset", "W8A8", "--hardware", "l4", "--batch", "64", "--plot", str(png),
            "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    (phase,) = res["phases"]
    assert phase["phase"] == "forward" and res["hardware"] == "l4"
    assert phase["flops"] == sum(c["flops"] for c in phase["layers"])
    assert all(c["compute"] == "int8" for c in phase["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_bad_inputs_are_one_line_exit_2(tmp_path):
    for args, text in ((("--hardware", "tpu"), "unknown hardware"), (("--batch", "0"), "--batch must be"),
                       (("--plot", str(tmp_path / "x.jpg")), "must end in .png")):
        r = run("cost", "fmnist-cnn", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and text in r.stderr, r.stderr
