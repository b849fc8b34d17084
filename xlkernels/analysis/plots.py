"""Shared plotting helpers (matplotlib, Agg backend; files only, never a window).

Each function takes plain tensors / arrays / dicts and writes a PNG (or any format matplotlib knows
from the suffix), returning the path.
"""
import math
import os


def _plt():
    import sys

    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _np(x):
    import numpy as np
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=float)


def _int_ticks(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_right(ax, n, **kw):
    """Legend outside the axes on the right (never over the data); 2 columns past 12 entries."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8,
              ncol=2 if n > 12 else 1, frameon=False, **kw)


def _save(fig, path):
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def layer_curves(curves: dict, path, title="", ylabel="score", xlabel="layer", ylim=None):
    """One line per key of `curves` ({label: per-layer values}) against the layer index."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in curves.items():
        ys = _np(ys)
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=str(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _int_ticks(ax)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        _legend_right(ax, len(curves))
    return _save(fig, path)


def mexa_curve(result: dict, path, pooling=None, title=None):
    """MEXA per layer for each language, from the dict `align.mexa` returns (ANC dashed, same colour, if
    present). The legend lists each language once plus a line-style key."""
    from matplotlib.lines import Line2D

    pooling = pooling or result["poolings"][0]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    has_anc = False
    for i, (lang, ys) in enumerate(result["mexa"][pooling].items()):
        c = colors[i % len(colors)]
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, color=c, label=str(lang))
        if "anc" in result and lang in result["anc"]:
            has_anc = True
            ax.plot(range(len(ys)), result["anc"][lang], ls="--", lw=1.2, color=c, alpha=0.6)
    ax.set_xlabel("layer (0 = embeddings)")
    _int_ticks(ax)
    ax.set_ylabel("alignment with " + result.get("pivot", "pivot"))
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title or f"MEXA per layer ({pooling} pooling, n={result.get('n', '?')})")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if has_anc:
        handles += [Line2D([], [], color="0.3", marker="o", markersize=3), Line2D([], [], color="0.3", ls="--")]
        labels += ["MEXA (solid)", "ANC (dashed)"]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8,
              frameon=False, ncol=2 if len(labels) > 14 else 1)
    return _save(fig, path)


def head_heatmaps(scores: dict, path, title="", cmap="viridis", shared_scale=True, cbar_label="score"):
    """One layer x head heatmap per language: scores {lang: (L, H)}.

    Constrained layout; axis labels only on the outer panels (panels share axes); integer ticks; one
    colorbar for all panels (shared_scale) or one per panel."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    if not scores:
        raise ValueError("scores is empty")
    k = len(scores)
    rows = math.ceil(k / 4)
    cols = math.ceil(k / rows)  # balanced grid, at most 4 per row
    arrays = {l: _np(v) for l, v in scores.items()}
    for l, a in arrays.items():
        if a.ndim != 2:
            raise ValueError(f"scores[{l!r}] must be (layers, heads), got shape {a.shape}")
    same = len({a.shape for a in arrays.values()}) == 1
    lo = min(a.min() for a in arrays.values()) if shared_scale else None
    hi = max(a.max() for a in arrays.values()) if shared_scale else None
    w = 2.6 if shared_scale else 3.1
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 0.8, 2.9 * rows + (0.4 if title else 0)),
                             squeeze=False, sharex=same, sharey=same, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.08, wspace=0.04, hspace=0.06)
    for ax in axes.flat[k:]:
        ax.axis("off")
    im = None
    for i, (ax, (lang, a)) in enumerate(zip(axes.flat, arrays.items())):
        im = ax.imshow(a, aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(str(lang), fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        r, c = divmod(i, cols)
        last_in_col = r == rows - 1 or i + cols >= k
        if not same or last_in_col:
            ax.set_xlabel("head", fontsize=9)
            ax.tick_params(labelbottom=True)
        if not same or c == 0:
            ax.set_ylabel("layer", fontsize=9)
        if not shared_scale:
            fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02).ax.tick_params(labelsize=7)
    if shared_scale and im is not None:
        cb = fig.colorbar(im, ax=axes[:, :].ravel().tolist(), shrink=0.9, aspect=30, pad=0.02)
        cb.set_label(cbar_label, fontsize=9)
        cb.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def neuron_counts(counts: dict, path, title="", kind="bar", ylabel="neurons"):
    """Per-layer neuron counts per language: counts {lang: (L,) ints}; kind "bar" (grouped) or "line"."""
    if kind not in ("bar", "line"):
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}")
    if kind == "line":
        return layer_curves(counts, path, title=title, ylabel=ylabel)
    plt = _plt()
    arrays = {l: _np(v) for l, v in counts.items()}
    L = max(len(a) for a in arrays.values())
    k = len(arrays)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(max(7, L * 0.45), 4))
    for i, (lang, a) in enumerate(arrays.items()):
        ax.bar([x + (i - (k - 1) / 2) * width for x in range(len(a))], a, width=width, label=str(lang))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(L))
    if title:
        ax.set_title(title)
    ax.set_xlim(-0.6, L - 0.4)
    ax.grid(alpha=0.3, axis="y")
    ax.set_axisbelow(True)
    if k > 1:
        _legend_right(ax, k)
    return _save(fig, path)
