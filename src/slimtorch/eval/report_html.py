"""``report.html``: a job's report.json as one self-contained page (inline CSS, figures as embedded PNG):
FP vs compressed metrics, size, latency, per-layer error and bits, and the roofline plot.

Everything is drawn from the report dict alone, so the page always shows exactly what report.json holds.
"""

from __future__ import annotations

import base64
import html
import io

FIGURE_DPI = 100


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metrics_figure(metrics: list[dict]) -> str:
    plt = _pyplot()
    rows = [m for m in metrics if m.get("fp") is not None]
    fig, axes = plt.subplots(1, max(1, len(rows)), figsize=(3.2 * max(1, len(rows)), 3), squeeze=False)
    for ax, m in zip(axes[0], rows):
        bars = ax.bar(["FP", "quantized"], [m["fp"], m["quantized"]], color=["tab:gray", "tab:blue"])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_title(m["name"] + (" (lower is better)" if not m.get("higher_is_better", True) else ""), fontsize=9)
    return _png(fig)


def layers_figure(layers: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(layers) + 2), 3.6))
    xs = range(len(layers))
    errs = [r["output_relative_error"] if r["output_relative_error"] is not None else r["weight_relative_error"]
            for r in layers]
    colors = {8: "tab:blue", 4: "tab:orange", 3: "tab:red", 2: "tab:purple"}
    ax.bar(xs, errs, color=[colors.get(r["weight_bits"], "tab:green") for r in layers])
    ax.set_yscale("log")
    ax.set_ylabel("relative output error (layer alone)")
    ax.set_xticks(list(xs), [r["name"] for r in layers], rotation=90, fontsize=6)
    for bits, color in colors.items():
        if any(r["weight_bits"] == bits for r in layers):
            ax.bar([0], [0], color=color, label=f"{bits}-bit weights")
    ax.legend(fontsize=7)
    return _png(fig)


def latency_figure(lat: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    med = [lat["fp"], lat["quantized_reference_path"]]
    spans = [lat.get("fp_p10_p90", [med[0]] * 2), lat.get("quantized_p10_p90", [med[1]] * 2)]
    err = [[m - s[0] for m, s in zip(med, spans)], [s[1] - m for m, s in zip(med, spans)]]
    bars = ax.bar(["FP", "quantized"], med, yerr=err, capsize=4, color=["tab:gray", "tab:blue"])
    ax.bar_label(bars, fmt="%.2f ms", fontsize=8)
    ax.set_ylabel("ms (median, p10-p90)")
    return _png(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 1 else f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _figure(name: str, png: str, caption: str) -> str:
    return (f'<figure id="{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
       "th{background:#f3f3f3}td:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}"
       "figcaption{font-size:90%;color:#555}.note{color:#555}")


def render_html(report: dict) -> str:
    """The page for a quantize or train-qat report dict."""
    title = f"{report['model']} {report.get('recipe', '')} ({report.get('method', '')})"
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>Measured on {html.escape(str(report.get('dataset', '')))}.</p>"]
    metrics = report.get("metrics", [])
    parts += ["<h2>Metrics</h2>", _table(["metric", "FP", "quantized", "unit"],
                                          [[m["name"], m.get("fp"), m["quantized"], m.get("unit", "")] for m in metrics])]
    if any(m.get("fp") is not None for m in metrics):
        parts.append(_figure("fig-metrics", metrics_figure(metrics), "FP and quantized metrics"))
    size = report.get("size", {})
    parts += ["<h2>Size</h2>", _table(["", "bytes"], [["FP (parameters and buffers in memory)", size.get("fp_bytes")],
                                                    ["quantized file", size.get("quantized_file_bytes")],
                                                    ["bits per weight", size.get("bits_per_weight")]])]
    lat = report.get("latency_ms")
    if lat:
        parts += ["<h2>Latency</h2>", _figure("fig-latency", latency_figure(lat),
                                             f"{lat.get('runtime', '')}; input {lat.get('input', '')}; "
                                             f"{lat.get('trials', '')} timings each, {lat.get('threads', '')} threads")]
    layers = report.get("layers") or []
    if layers:
        parts += ["<h2>Per-layer error and bits</h2>",
                  _figure("fig-layers", layers_figure(layers), "relative output error of each quantized layer alone, "
                          "on the FP model's input to it (weight error where the example does not reach the layer)"),
                  _table(["layer", "kind", "weight", "act bits", "params", "weight rel. error", "output rel. error"],
                         [[r["name"], r["kind"], r["weight_dtype"], r["act_bits"], r["params"],
                           r["weight_relative_error"], r["output_relative_error"]] for r in layers])]
    roof = report.get("roofline")
    if roof:
        from slimtorch.cost.plot import roofline_figure

        png = base64.b64encode(roofline_figure(roof, report["model"])).decode("ascii")
        parts += ["<h2>Roofline (modelled, not measured)</h2>",
                  _figure("fig-roofline", png, f"cost model on {roof['hardware']}: each layer's arithmetic intensity "
                          f"and attainable FLOP/s under the quantized plan")]
    notes = report.get("notes") or []
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f'<li class="note">{html.escape(n)}</li>' for n in notes) + "</ul>"]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
