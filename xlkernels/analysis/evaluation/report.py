"""The evaluation result as a Markdown table, a success-vs-fluency plot and files (eval.json/.md/.png)."""
from __future__ import annotations

import json
import math
import os

STRENGTH_NAME = {"shift": "alpha", "itlc": "alpha", "incline": "sigma", "forcing": "set-value scale",
                 "gate": "gate scale", "neurons": "-", "none": "-"}


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def to_markdown(result: dict) -> str:
    """The result as a Markdown table (one line per plan and strength, the unsteered model first)."""
    src, tgt = result["source"], result["target"]
    lines = [f"| plan | method | strength | {tgt} % | {src} % | unknown % | NLL (Δ) | rep-3 | tok/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        st = "-" if r["strength"] is None else f"{STRENGTH_NAME[r['method']]} {r['strength']:g}"
        d = r.get("nll_delta")
        nll = _fmt(r["nll"], ".2f") + ("" if d is None or r["plan"] == "unsteered" else f" ({d:+.2f})")
        lines.append(f"| {r['plan']} | {r['method']} | {st} | {100 * r['target_rate']:.0f} | "
                     f"{100 * r['source_rate']:.0f} | {100 * r['unknown_rate']:.0f} | {nll} | "
                     f"{r['repetition']:.2f} | {_fmt(r['tokens_per_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path, title=None):
    """Success (target rate) against fluency cost (NLL under the unsteered model): one curve per plan,
    points in strength order and labelled with the strength; the unsteered model as a star."""
    from ..plots import _legend_right, _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = []
    for r in result["rows"]:
        if r["plan"] not in names:
            names.append(r["plan"])
    for name in names:
        rows = [r for r in result["rows"] if r["plan"] == name]
        if name == "unsteered":
            ax.scatter([rows[0]["nll"]], [100 * rows[0]["target_rate"]], marker="*", s=160, color="black",
                       label="unsteered", zorder=3)
            continue
        rows.sort(key=lambda r: -math.inf if r["strength"] is None else r["strength"])
        xs, ys = [r["nll"] for r in rows], [100 * r["target_rate"] for r in rows]
        line, = ax.plot(xs, ys, marker="o", label=f"{name} ({STRENGTH_NAME[rows[0]['method']]})")
        for r, x, y in zip(rows, xs, ys):
            if r["strength"] is not None:
                ax.annotate(f"{r['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=line.get_color())
    ax.set_xlabel("fluency cost: NLL of the generated tokens under the unsteered model")
    ax.set_ylabel(f"generations identified as {result['target']} (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"steering {result['source']} -> {result['target']}: success vs fluency")
    _legend_right(ax, len(names))
    return _save(fig, path)


def save(result: dict, out, title=None) -> dict:
    """Write eval.json, eval.md and eval.png into directory `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"eval.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    with open(paths["md"], "w") as f:
        f.write(to_markdown(result))
    plot(result, paths["png"], title)
    return paths
