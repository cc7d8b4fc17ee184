"""Roofline plot of a phase's layers: from the cost model's phases, or from their JSON form in a report."""

from __future__ import annotations

import io
from pathlib import Path

from slimtorch.cost.estimate import PhaseCost
from slimtorch.cost.hardware import Hardware
from slimtorch.io.checkpoint import atomic_write_bytes

_COLORS = {"linear": "tab:blue", "conv2d": "tab:green", "attention": "tab:red"}


def roofline_data(phases: list[PhaseCost], hw: Hardware) -> dict:
    """The points and roofs of a roofline plot as JSON data (a report carries them; the plot is drawn
    from them): per phase, per layer its kind, compute format, intensity and attainable FLOP/s."""
    computes = sorted({c.compute for p in phases for c in p.layers})
    return {
        "hardware": hw.name, "mem_bandwidth": hw.mem_bandwidth, "peaks": {c: hw.peak(c) for c in computes},
        "phases": [{"phase": p.phase, "layers": [
            {"name": c.name, "kind": c.kind, "compute": c.compute, "intensity": c.intensity,
             "flops_per_s": c.flops / c.time(hw)} for c in p.layers]} for p in phases],
    }


def roofline_figure(data: dict, title: str) -> bytes:
    """PNG bytes of the roofline plot of :func:`roofline_data`'s output, one panel per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = data["phases"]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        layers = phase["layers"]
        xs = [c["intensity"] for c in layers]
        lo, hi = min(xs + [0.1]) / 2, max(xs + [1e4]) * 2
        for compute in sorted({c["compute"] for c in layers}):
            peak = data["peaks"][compute]
            ridge = peak / data["mem_bandwidth"]
            ax.plot([lo, ridge, hi], [lo * data["mem_bandwidth"], peak, peak], lw=1, label=f"{compute} roof")
        for kind in sorted({c["kind"] for c in layers}):
            pts = [c for c in layers if c["kind"] == kind]
            ax.scatter([c["intensity"] for c in pts], [c["flops_per_s"] for c in pts], s=14,
                       color=_COLORS.get(kind, "k"), label=f"{kind} ({len(pts)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("attainable FLOP/s")
        ax.set_title(f"{title}: {phase['phase']} on {data['hardware']}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def roofline_png(phases: list[PhaseCost], hw: Hardware, path: Path, title: str) -> None:
    """Write the roofline plot of ``phases`` on ``hw`` to ``path`` (PNG, atomically)."""
    atomic_write_bytes(Path(path), roofline_figure(roofline_data(phases, hw), title))
