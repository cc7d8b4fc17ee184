"""Roofline plot of a phase's layers (PNG, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

from slimtorch.cost.estimate import PhaseCost
from slimtorch.cost.hardware import Hardware
from slimtorch.io.checkpoint import atomic_write_bytes

_COLORS = {"linear": "tab:blue", "conv2d": "tab:green", "attention": "tab:red"}


def roofline_png(phases: list[PhaseCost], hw: Hardware, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        xs = [c.intensity for c in phase.layers]
        lo, hi = min(xs + [0.1]) / 2, max(xs + [1e4]) * 2
        for compute in sorted({c.compute for c in phase.layers}):
            peak = hw.peak(compute)
            ridge = peak / hw.mem_bandwidth
            ax.plot([lo, ridge, hi], [lo * hw.mem_bandwidth, peak, peak], lw=1, label=f"{compute} roof")
        for kind in sorted({c.kind for c in phase.layers}):
            pts = [c for c in phase.layers if c.kind == kind]
            ax.scatter([c.intensity for c in pts], [c.flops / c.time(hw) for c in pts], s=14,
                       color=_COLORS.get(kind, "k"), label=f"{kind} ({len(pts)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("attainable FLOP/s")
        ax.set_title(f"{title}: {phase.phase} on {hw.name}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
