"""Two pictures that the notebooks and the documentation share, drawn with matplotlib.

    gpt_block_figure()   one transformer block: the forward data flow (up), the gradient flow
                         (down), where the residual stream splits and merges, and where each
                         parameter's gradient is made
    layernorm_figure()   layer norm as a computational graph: each node an elementary step of the
                         forward, each edge labelled with what the backward sends along it

    python -m tinylm.diagrams DIR   writes both as PNG files into DIR (the docs build uses them)

Nothing here is computed from a model: the pictures are fixed drawings of the formulas that
tinylm/model.py and tinylm/layers.py implement, so they are kept next to the code they picture.
"""

from __future__ import annotations

import sys
from pathlib import Path

FORWARD = "#1f4e79"  # the forward pass: dark blue, solid
BACKWARD = "#c0392b"  # the backward pass: red, dashed
PARAM = "#7d6608"  # parameters and their gradients: olive

# ----------------------------------------------------------------------------------------------
# Drawing helpers


def _box(ax, xy, text, width=2.6, height=0.62, color=FORWARD, fill="#eaf1f8", fontsize=10):
    """A rounded box centred at xy; returns its (x, y, width, height)."""
    from matplotlib.patches import FancyBboxPatch

    x, y = xy
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            linewidth=1.2,
            edgecolor=color,
            facecolor=fill,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color="black")
    return x, y, width, height


def _arrow(ax, start, end, color=FORWARD, dashed=False, text=None, text_xy=None, fontsize=8.5,
           connection="arc3"):
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops=dict(
            arrowstyle="-|>",
            color=color,
            lw=1.4,
            linestyle="--" if dashed else "-",
            shrinkA=2,
            shrinkB=2,
            connectionstyle=connection,
        ),
    )
    if text:
        ax.text(*text_xy, text, fontsize=fontsize, color=color, ha="left", va="center")


def _dot(ax, xy, text=None, color=FORWARD):
    ax.plot(*xy, "o", color=color, ms=6, zorder=5)
    if text:
        ax.text(xy[0] - 0.25, xy[1], text, fontsize=12, ha="right", va="center", color=color)


# ----------------------------------------------------------------------------------------------
# The GPT block


def gpt_block_figure():
    """One pre-LN transformer block, x -> x + attn(LN_1(x)) -> + mlp(LN_2(.)): the figure.

    Blue arrows run the forward (bottom to top); red dashed ones the backward (top to bottom).
    At each split of the residual stream the backward *adds* the gradient that came around the
    branch to the one that came through it. Olive notes say which gradient each parameter gets.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 10.5))
    ax.set_xlim(-3.6, 8.4)
    ax.set_ylim(-0.9, 13.4)
    ax.axis("off")

    main, skip = 1.4, -2.2  # x positions of the branch column and of the residual stream
    rows = {  # y position of each step of the block, bottom to top
        "x": 0.0,
        "ln1": 1.3,
        "qkv": 2.5,
        "attn": 3.7,
        "proj": 4.9,
        "add1": 6.0,
        "ln2": 7.2,
        "fc": 8.4,
        "gelu": 9.6,
        "proj2": 10.8,
        "add2": 11.9,
    }
    y = rows

    # -- the residual stream (left) and its two merges --
    _dot(ax, (skip, y["x"]), "x")
    ax.text(skip, y["x"] - 0.55, "input (B, T, C)", ha="center", fontsize=9)
    _dot(ax, (skip, y["add1"]), "x'")
    _dot(ax, (skip, y["add2"]), "out")
    ax.text(skip, y["add2"] + 0.55, "output (B, T, C)", ha="center", fontsize=9)
    for lo, hi in (("x", "add1"), ("add1", "add2")):
        _arrow(ax, (skip, y[lo] + 0.1), (skip, y[hi] - 0.12))
    ax.text(skip - 0.2, (y["x"] + y["add1"]) / 2, "residual\nstream", ha="right", va="center",
            fontsize=9, color=FORWARD)

    # -- the two branches (centre) --
    boxes = [
        ("ln1", "LN$_1$ (layer norm)"),
        ("qkv", "c_attn: $[q\\,k\\,v] = h W + b$"),
        ("attn", "causal attention, H heads"),
        ("proj", "c_proj: $a W + b$"),
        ("ln2", "LN$_2$ (layer norm)"),
        ("fc", "c_fc: $h W + b$  (C → 4C)"),
        ("gelu", "GELU"),
        ("proj2", "c_proj: $g W + b$  (4C → C)"),
    ]
    for key, label in boxes:
        _box(ax, (main, y[key]), label, width=3.6)
    for lo, hi in (("ln1", "qkv"), ("qkv", "attn"), ("attn", "proj"), ("ln2", "fc"),
                   ("fc", "gelu"), ("gelu", "proj2")):
        _arrow(ax, (main, y[lo] + 0.31), (main, y[hi] - 0.31))
    # split: the stream feeds the branch; merge: the branch output is added to the stream
    for split, first, last, merge in (("x", "ln1", "proj", "add1"),
                                      ("add1", "ln2", "proj2", "add2")):
        _arrow(ax, (skip + 0.1, y[split] + 0.05), (main - 1.8, y[first] - 0.1),
               connection="arc3,rad=-0.15")
        _arrow(ax, (main - 1.8, y[last] + 0.1), (skip + 0.12, y[merge] - 0.02),
               connection="arc3,rad=-0.1")
        ax.text(skip + 0.35, y[merge] + 0.12, "+", fontsize=16, color=FORWARD, fontweight="bold")

    # -- the backward: red, down the stream and down each branch --
    back = skip - 0.55
    for hi, lo in (("add2", "add1"), ("add1", "x")):
        _arrow(ax, (back, y[hi] - 0.1), (back, y[lo] + 0.1), color=BACKWARD, dashed=True)
    bx = main + 2.05
    _arrow(ax, (bx, y["proj2"] + 0.2), (bx, y["ln2"] - 0.2), color=BACKWARD, dashed=True)
    _arrow(ax, (bx, y["proj"] + 0.2), (bx, y["ln1"] - 0.2), color=BACKWARD, dashed=True)
    ax.text(back - 0.15, y["add2"] - 0.5, "d out", color=BACKWARD, fontsize=9, ha="right")
    note = (
        "split of the stream:  d x = d x'  (around the branch)\n"
        "                             + LN$_1$-backward( ... c_proj-backward(d x') )  (through it)"
    )
    ax.text(main - 1.6, -0.55, note, color=BACKWARD, fontsize=8.5, ha="left", va="center")

    # -- where each parameter's gradient comes from (right) --
    px = main + 2.35
    grads = {
        "ln1": "dγ$_1$ = Σ d h ⊙ x̂,  dβ$_1$ = Σ d h",
        "qkv": "dW = h$^T$ d[q k v],  db = Σ d[q k v]",
        "attn": "no parameters: d q, d k, d v",
        "proj": "dW = a$^T$ d x',  db = Σ d x'",
        "ln2": "dγ$_2$, dβ$_2$ as LN$_1$",
        "fc": "dW = h$^T$ d f,  db = Σ d f",
        "gelu": "no parameters: d f = d g ⊙ GELU'(f)",
        "proj2": "dW = g$^T$ d out,  db = Σ d out",
    }
    for key, text in grads.items():
        ax.text(px + 0.25, y[key], text, fontsize=8.5, color=PARAM, va="center")
    ax.text(px + 0.25, y["add2"] + 0.55, "gradient of each parameter (Σ: over B and T)",
            fontsize=9, color=PARAM, fontweight="bold")

    # -- legend --
    ax.plot([], [], color=FORWARD, lw=1.4, label="forward (data, bottom to top)")
    ax.plot([], [], color=BACKWARD, lw=1.4, ls="--", label="backward (gradients, top to bottom)")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=9, frameon=False)
    ax.set_title("One GPT block (pre-LN), forward and backward", fontsize=12)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Layer norm as a graph


def layernorm_figure():
    """Layer norm's forward as a graph of elementary steps, with the backward on its edges.

    The letters are docs/math.md's: R rows of C channels, rstd = 1/sqrt(var + eps), out the output.
    x feeds two nodes (the mean and the centring), and the centred xc feeds two more (the
    variance and the normalisation): at each such fan-out the backward sums the gradients that
    come back along the outgoing edges. That sum is why layernorm_backward has three terms.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.6))
    ax.set_xlim(-1.0, 13.4)
    ax.set_ylim(-1.9, 4.4)
    ax.axis("off")

    nodes = {  # name: (x, y, label)
        "x": (0.3, 1.5, "$x$\n(R, C)"),
        "mu": (2.6, 3.2, "$\\mu = \\frac{1}{C}\\sum_j x_j$"),
        "xc": (4.4, 1.5, "$x_c = x - \\mu$"),
        "var": (6.6, 3.2, "$\\sigma^2 = \\frac{1}{C}\\sum_j x_{c,j}^2$"),
        "rstd": (9.2, 3.2, "$\\mathrm{rstd} = (\\sigma^2 + \\varepsilon)^{-1/2}$"),
        "xhat": (9.2, 1.5, "$\\hat x = x_c \\, \\mathrm{rstd}$"),
        "out": (12.0, 1.5, "$\\mathrm{out} = \\gamma \\odot \\hat x + \\beta$"),
    }
    for x, y, label in nodes.values():
        _box(ax, (x, y), label, width=2.15, height=0.8, fontsize=10.5)
    edges = [  # (from, to, what the backward sends back along this edge)
        ("x", "mu", None),
        ("x", "xc", None),
        ("mu", "xc", None),
        ("xc", "var", None),
        ("xc", "xhat", None),
        ("var", "rstd", None),
        ("rstd", "xhat", None),
        ("xhat", "out", None),
    ]
    for a, b, _ in edges:
        xa, ya, _ = nodes[a]
        xb, yb, _ = nodes[b]
        _arrow(ax, (xa + 1.05 * (xb > xa) - 0.0, ya + 0.4 * (yb > ya) - 0.4 * (yb < ya)),
               (xb - 1.05 * (xb > xa), yb - 0.4 * (yb > ya) + 0.4 * (yb < ya)))

    # the backward, node by node (red), written where each gradient is formed
    back = [
        (12.0, 0.45, "$d\\hat x = \\gamma \\odot d\\mathrm{out}$\n"
                     "$d\\gamma = \\sum_r d\\mathrm{out} \\odot \\hat x$,  "
                     "$d\\beta = \\sum_r d\\mathrm{out}$"),
        (9.2, 4.0, "$d\\mathrm{rstd} = \\sum_j d\\hat x_j \\, x_{c,j}$"),
        (6.6, 4.0, "$d\\sigma^2 = -\\frac{1}{2} \\mathrm{rstd}^3 \\, d\\mathrm{rstd}$"),
        (5.5, 0.25, "$dx_c = d\\hat x \\, \\mathrm{rstd} + \\frac{2}{C} x_c \\, d\\sigma^2$\n"
                    "(two edges leave $x_c$: their gradients add)"),
        (2.6, 4.0, "$d\\mu = -\\sum_j dx_{c,j}$"),
        (1.0, -0.55, "$dx = dx_c + \\frac{1}{C} d\\mu$\n(two edges leave $x$: they add)"),
    ]
    for x, y, text in back:
        ax.text(x, y, text, color=BACKWARD, fontsize=9.5, ha="center", va="center")
    ax.text(6.2, -1.35,
            "Together:  $dx = \\mathrm{rstd}\\,(d\\hat x - \\mathrm{mean}_j\\, d\\hat x_j "
            "- \\hat x \\; \\mathrm{mean}_j\\, d\\hat x_j \\hat x_j)$,  "
            "the line in layers.layernorm_backward",
            fontsize=10, color=BACKWARD, ha="center")
    ax.plot([], [], color=FORWARD, lw=1.4, label="forward: one elementary step per node")
    ax.plot([], [], color=BACKWARD, lw=0, marker="s", label="backward: the gradient formed there")
    ax.legend(loc="lower left", fontsize=9, frameon=False, bbox_to_anchor=(0.0, -0.12), ncol=2)
    ax.set_title("Layer norm over one row of C features, as a computational graph", fontsize=12)
    fig.tight_layout()
    return fig


def save_all(directory) -> list[Path]:
    """Write gpt_block.png and layernorm_graph.png into directory; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("gpt_block.png", gpt_block_figure), ("layernorm_graph.png",
                                                             layernorm_figure)):
        fig = make()
        path = out / name
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in save_all(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
