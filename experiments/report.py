"""Plots, tables and findings for each study, computed from its JSON numbers; and REPORT.md."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

Table = tuple[list[str], list[list[str]]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _last(seq):
    return seq[-1] if seq else None


def format_value(v: Any) -> str:
    """A setting as a person writes it: ``3.2e-4`` rather than ``0.00031622776601683794``."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(u) for u in v) + "]"
    if isinstance(v, float):
        if v != 0 and not 1e-2 <= abs(v) < 1e4:
            mantissa, exponent = f"{v:.1e}".split("e")
            return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
        return f"{v:.3g}"
    return str(v)


def _curves(runs: dict, path: str, title: str, keys=("loss", "train_acc", "val_acc")) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    labels = {"loss": ("iteration", "training loss"), "train_acc": ("epoch", "train accuracy"),
              "val_acc": ("epoch", "validation accuracy")}
    for ax, key in zip(axes, keys):
        for name, run in runs.items():
            values = np.array([np.nan if v is None else v for v in run[key]])
            xs = np.arange(1, len(values) + 1)
            ax.plot(xs, values, label=name, marker="o" if key != "loss" else None,
                    linewidth=1 if key == "loss" else 1.5, alpha=0.8)
        ax.set_xlabel(labels[key][0])
        ax.set_ylabel(labels[key][1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_rows(runs: dict) -> Table:
    header = ["run", "final loss", "final train acc", "final val acc", "best val acc"]
    rows = [[name, _f(_last(r["loss"])), _f(_last(r["train_acc"])), _f(_last(r["val_acc"])),
             _f(max((v for v in r["val_acc"] if v is not None), default=None))]
            for name, r in runs.items()]
    return header, rows


# --- bn_vs_baseline ----------------------------------------------------------------------------

def plot_bn_vs_baseline(res: dict, path: str) -> None:
    _curves(res["runs"], path, "Batch norm vs layer norm vs none (6-layer net)")


def summarize_bn_vs_baseline(res: dict) -> tuple[Table, list[str]]:
    runs = res["runs"]
    final = {k: _last(r["val_acc"]) for k, r in runs.items()}
    first = {k: r["val_acc"][0] for k, r in runs.items()}
    epochs = res["config"]["epochs"]
    first_loss = {k: statistics.mean(v for v in r["loss"][:len(r["loss"]) // epochs]
                                     if v is not None) for k, r in runs.items()}
    best = max(final, key=lambda k: -1 if final[k] is None else final[k])
    early = (first["batchnorm"] or 0) - (first["none"] or 0)
    steps = res["config"]["num_train"] // res["config"]["batch_size"]
    momentum = res["config"].get("momentum", 0.9)
    leftover = momentum ** steps
    share = (f"still {leftover:.0%} initial value (mean 0, variance 1), which dominates them"
             if leftover >= 0.5 else
             f"still {leftover:.0%} initial value (mean 0, variance 1), and the rest is an "
             f"average of batch statistics taken while the weights were changing fast")
    findings = [
        "Final validation accuracy: " + ", ".join(f"{k} {_f(v)}" for k, v in final.items())
        + f"; the highest is {best}.",
        f"After the first epoch, batch norm's validation accuracy was {_f(first['batchnorm'])} "
        f"against {_f(first['none'])} without normalization "
        + ("(faster early progress with batch norm)." if early > 0.02 else
           f"(no clear early advantage in test-mode accuracy, {early:+.3f}: test mode uses the "
           f"running statistics, and after one epoch of {steps} steps at momentum {momentum} "
           f"they are {share})."),
        "Mean training loss over the first epoch (train mode, batch statistics): "
        + ", ".join(f"{k} {v:.3f}" for k, v in first_loss.items()) + ".",
    ]
    return _run_rows(runs), findings


# --- weight_scale ------------------------------------------------------------------------------

def plot_weight_scale(res: dict, path: str) -> None:
    plt = _plt()
    scales = res["config"]["weight_scales"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in zip(axes, ("best_val_acc", "best_train_acc", "final_loss"),
                              ("best validation accuracy", "best train accuracy",
                               "final training loss")):
        for name in ("batchnorm", "none"):
            values = [np.nan if v is None else v for v in res[name][key]]
            ax.semilogx(scales, values, "-o", label=name)
            if key == "final_loss":
                ax.set_yscale("log")
        ax.set_xlabel("weight initialization scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Sensitivity to the weight initialization scale (8-layer net)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize_weight_scale(res: dict) -> tuple[Table, list[str]]:
    scales = res["config"]["weight_scales"]
    header = ["run", "scales with best val acc >= 0.5", "useful range", "best val acc",
              "at scale"]
    rows, findings, useful_counts = [], [], {}
    for name in ("batchnorm", "none"):
        accs = [(-1 if v is None else v) for v in res[name]["best_val_acc"]]
        useful = [s for s, a in zip(scales, accs) if a >= 0.5]
        useful_counts[name] = len(useful)
        i = int(np.argmax(accs))
        span = f"{min(useful):.2g} .. {max(useful):.2g}" if useful else "none"
        rows.append([name, f"{len(useful)} of {len(scales)}", span, _f(accs[i]), f"{scales[i]:.2g}"])
    findings.append(
        f"With batch norm, {useful_counts['batchnorm']} of {len(scales)} weight scales reach a "
        f"validation accuracy of at least 0.5; without it, {useful_counts['none']} do"
        + (" — batch norm widens the range of workable initializations."
           if useful_counts["batchnorm"] > useful_counts["none"] else "."))
    nan_none = sum(v is None for v in res["none"]["final_loss"])
    if nan_none:
        findings.append(f"Without batch norm, {nan_none} scale(s) ended with a non-finite loss.")
    return (header, rows), findings


# --- batch_size --------------------------------------------------------------------------------

def plot_batch_size(res: dict, path: str) -> None:
    """Small multiples: one column per normalization, one row per metric; batch sizes told apart
    by line style and marker as well as colour; the legend outside the axes."""
    plt = _plt()
    runs, sizes = res["runs"], res["config"]["batch_sizes"]
    names = ("batchnorm", "layernorm", "none")
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "d")]
    fig, axes = plt.subplots(2, len(names), figsize=(12, 6), sharex=True, sharey="row")
    for col, name in enumerate(names):
        for row, key in enumerate(("train_acc", "val_acc")):
            ax = axes[row, col]
            for (line, marker), bs in zip(styles, sizes):
                values = runs[f"{name}/{bs}"][key]
                ax.plot(np.arange(1, len(values) + 1), values, linestyle=line, marker=marker,
                        markersize=4, label=str(bs))
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if row == 0:
                ax.set_title(name)
            else:
                ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel(key.replace("_acc", " accuracy").replace("val", "validation"))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="batch size")
    fig.suptitle("Batch size: batch norm vs layer norm vs none")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize_batch_size(res: dict) -> tuple[Table, list[str]]:
    runs = res["runs"]
    sizes = res["config"]["batch_sizes"]
    small, large = min(sizes), max(sizes)
    findings = []
    change = {}
    for name in ("batchnorm", "layernorm", "none"):
        a, b = _last(runs[f"{name}/{small}"]["val_acc"]), _last(runs[f"{name}/{large}"]["val_acc"])
        change[name] = None if a is None or b is None else a - b
        findings.append(f"{name}: final validation accuracy {_f(a)} at batch size {small}, "
                        f"{_f(b)} at {large}.")
    if (change["batchnorm"] is not None and change["layernorm"] is not None
            and max(abs(change["batchnorm"]), abs(change["layernorm"])) < 0.02):
        findings.append(f"Going from batch {large} to batch {small} moved batch norm's accuracy by "
                        f"{change['batchnorm']:+.3f} and layer norm's by {change['layernorm']:+.3f}: "
                        f"both within 0.02, no clear batch-size sensitivity at these settings.")
    elif change["batchnorm"] is not None and change["layernorm"] is not None:
        more = "batch norm" if abs(change["batchnorm"]) > abs(change["layernorm"]) else "layer norm"
        findings.append(f"Going from batch {large} to batch {small} moved batch norm's accuracy by "
                        f"{change['batchnorm']:+.3f} and layer norm's by {change['layernorm']:+.3f}: "
                        f"{more} is the more sensitive to the batch size here (at equal epochs, "
                        f"smaller batches also take more steps).")
    return _run_rows(runs), findings


# --- dropout -----------------------------------------------------------------------------------

def plot_dropout(res: dict, path: str) -> None:
    _curves({f"rate {k}": v for k, v in res["runs"].items()}, path,
            "Dropout on 500 examples (one hidden layer of 500)", keys=("train_acc", "val_acc"))


def summarize_dropout(res: dict) -> tuple[Table, list[str]]:
    runs = res["runs"]
    header = ["drop rate", "final train acc", "final val acc", "train - val gap", "best val acc"]
    rows, gaps = [], {}
    for rate, run in runs.items():
        tr, va = _last(run["train_acc"]), _last(run["val_acc"])
        gaps[rate] = tr - va
        rows.append([rate, _f(tr), _f(va), _f(gaps[rate]), _f(max(run["val_acc"]))])
    r0, r1 = list(runs)
    findings = [f"The train-validation gap was {gaps[r0]:.3f} without dropout and {gaps[r1]:.3f} "
                f"with drop rate {r1}"
                + (": dropout regularizes." if gaps[r1] < gaps[r0] else ": no smaller with dropout here."),
                f"Final validation accuracy: {_f(_last(runs[r0]['val_acc']))} (rate {r0}) vs "
                f"{_f(_last(runs[r1]['val_acc']))} (rate {r1})."]
    return (header, rows), findings


# --- spatial_bn --------------------------------------------------------------------------------

def plot_spatial_bn(res: dict, path: str) -> None:
    _curves(res["runs"], path, "Conv net with and without spatial batch norm")


def summarize_spatial_bn(res: dict) -> tuple[Table, list[str]]:
    runs = res["runs"]
    bn, none = runs["batchnorm"], runs["none"]
    findings = [
        f"Final validation accuracy {_f(_last(bn['val_acc']))} with spatial batch norm and "
        f"{_f(_last(none['val_acc']))} without; after one epoch {_f(bn['val_acc'][0])} vs "
        f"{_f(none['val_acc'][0])}.",
        f"Final training loss {_f(_last(bn['loss']))} with and {_f(_last(none['loss']))} without.",
    ]
    return _run_rows(runs), findings


# --- backward_speed ----------------------------------------------------------------------------

VARIANTS = ["jax_graph", "jax_alt", "jax_autodiff", "numpy_graph", "numpy_alt"]


def plot_backward_speed(res: dict, path: str) -> None:
    plt = _plt()
    rows = res["rows"]
    labels = ["x".join(map(str, r["shape"])) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.16
    for i, v in enumerate(VARIANTS):
        ax.bar(np.arange(len(rows)) + (i - 2) * width, [r["seconds"][v] * 1e3 for r in rows],
               width, label=v)
    ax.set_xticks(np.arange(len(rows)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_xlabel("shape (N, D)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize_backward_speed(res: dict) -> tuple[Table, list[str]]:
    header = ["shape"] + [f"{v} ms" for v in VARIANTS] + ["numpy graph/alt", "jax graph/alt",
                                                         "jax autodiff/alt"]
    rows, np_ratio, jax_ratio, ad_ratio = [], [], [], []
    for r in res["rows"]:
        s = r["seconds"]
        np_ratio.append(s["numpy_graph"] / s["numpy_alt"])
        jax_ratio.append(s["jax_graph"] / s["jax_alt"])
        ad_ratio.append(s["jax_autodiff"] / s["jax_alt"])
        rows.append(["x".join(map(str, r["shape"]))] + [f"{s[v] * 1e3:.3f}" for v in VARIANTS]
                    + [f"{np_ratio[-1]:.2f}", f"{jax_ratio[-1]:.2f}", f"{ad_ratio[-1]:.2f}"])
    m_np, m_jax, m_ad = (statistics.median(x) for x in (np_ratio, jax_ratio, ad_ratio))
    xla = ("about the same cost (XLA fuses the staged graph's elementwise nodes into the same few "
           "loops)" if 0.9 <= m_jax <= 1.1 else
           f"alt {m_jax:.2f}x faster" if m_jax > 1.1 else f"graph {1 / m_jax:.2f}x faster")
    findings = [
        f"numpy: the staged backward takes {m_np:.2f}x the time of the simplified one (median over "
        f"shapes); the write-ups report about 2x"
        + (" — reproduced." if m_np >= 1.5 else " — not reproduced at these shapes."),
        f"Under XLA (jitted): graph/alt = {m_jax:.2f} (median), i.e. {xla}.",
        f"jax.vjp of the naive forward takes {m_ad:.2f}x the time of the hand-written alt rule "
        f"(median over shapes).",
    ]
    return (header, rows), findings


def markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
