"""Plots, tables, findings and notes for each study, computed from its JSON numbers.

Runs hold per-seed lists (seed axis first). Plots draw the mean over the seeds as a line and the
range (min to max) as a band; findings come from :mod:`experiments.findings` (a difference is
stated only when it exceeds its seed-to-seed spread); notes explain what a plot shows without
claiming an effect.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from experiments.findings import LOSS, Finding, difference, ratio, spread

Table = tuple[list[str], list[list[str]]]
Summary = tuple[Table, list[Finding], list[str]]
NAMES = {"none": "no normalization", "batchnorm": "batch norm", "layernorm": "layer norm"}
CHANCE = 0.1  # ten classes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _array(values) -> np.ndarray:
    """JSON lists (None for non-finite) to a float array with NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in values], np.float64) \
        if values and isinstance(values[0], list) else \
        np.array([np.nan if v is None else v for v in values], np.float64)


LAST = 3  # "final" accuracy: the mean over the last LAST epochs (one epoch's value is noisier)


def _final(run: dict, key: str) -> np.ndarray:
    """Per-seed final accuracy: the mean of the last :data:`LAST` epochs' values."""
    return np.mean(_array(run[key])[:, -LAST:], axis=1)


def _epoch_loss(run: dict, epochs: int, epoch: int) -> np.ndarray:
    """Per-seed mean training loss over the steps of one epoch (0-based; -1 the last)."""
    loss = _array(run["loss"])
    steps = loss.shape[1] // epochs
    epoch = epoch % epochs
    return np.nanmean(loss[:, epoch * steps:(epoch + 1) * steps], axis=1)


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


def band(ax, xs, values, label: str, **style) -> None:
    """Mean over the seeds (rows of ``values``) as a line, min to max as a band."""
    values = np.asarray(values, np.float64)
    with np.errstate(all="ignore"):
        mean, low, high = (np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0))
    (line,) = ax.plot(xs, mean, label=label, **style)
    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def _save(fig, path: str, title: str, note: str | None = None) -> None:
    fig.suptitle(title)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, ha="left", va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _curves(runs: dict, path: str, title: str, keys=("loss", "train_acc", "val_acc"),
            note: str | None = None) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.3 if note else 4))
    labels = {"loss": ("iteration", "training loss (train mode)"),
              "train_acc": ("epoch", "train accuracy (test mode)"),
              "val_acc": ("epoch", "validation accuracy (test mode)")}
    for ax, key in zip(axes, keys):
        for name, run in runs.items():
            values = _array(run[key])
            xs = np.arange(1, values.shape[1] + 1)
            band(ax, xs, values, name, marker=None if key == "loss" else "o",
                 linewidth=1 if key == "loss" else 1.5, markersize=3)
        if key != "loss":
            ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(labels[key][0])
        ax.set_ylabel(labels[key][1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, title, note)


def _run_rows(runs: dict, epochs: int, names=None) -> Table:
    header = ["run", "last epoch's loss", f"final train acc (last {LAST} epochs)",
              f"final val acc (last {LAST} epochs)", "best val acc"]
    rows = []
    for name, r in runs.items():
        rows.append([(names or {}).get(name, name), spread(_epoch_loss(r, epochs, -1)),
                     spread(_final(r, "train_acc")), spread(_final(r, "val_acc")),
                     spread(np.nanmax(_array(r["val_acc"]), 1))])
    return header, rows


def running_stats_note(first_val_acc, *, steps: int, momentum: float, who: str = "Batch norm"
                       ) -> str | None:
    """Why batch norm's accuracy after the first epoch can be below chance, from the numbers;
    None when it is not low (at least half way from chance to 1 on every seed)."""
    first = np.asarray(first_val_acc, np.float64)
    if np.min(first) >= (CHANCE + 1) / 2:
        return None
    left = momentum ** steps
    where = (f"below chance ({CHANCE:.2f})" if np.mean(first) < CHANCE else
             f"near chance ({CHANCE:.2f})" if np.mean(first) < 2 * CHANCE else
             "far below its later accuracy")
    return (f"{who}'s validation accuracy after the first epoch is {spread(first)}, {where}. "
            f"Accuracy is measured in test mode, which normalizes with the running "
            f"statistics; after one epoch of {steps} steps at momentum {momentum} they still hold "
            f"momentum^steps = {momentum}^{steps} = {left:.0%} of their initial values (mean 0, "
            f"variance 1), and the rest is an average of batch statistics taken while the weights "
            f"were changing fast. Training itself uses the batch statistics, and its loss falls "
            f"from the start.")


def lag_plot_note(first_val_acc, *, steps: int, momentum: float) -> str | None:
    """The plot's one-line version of :func:`running_stats_note` (None when that is None)."""
    if running_stats_note(first_val_acc, steps=steps, momentum=momentum) is None:
        return None
    return (f"Epoch 1, batch norm: test mode normalizes with running statistics that still hold "
            f"{momentum}^{steps} = {momentum ** steps:.0%} of their initial values, hence the low "
            f"first point.")


# --- bn_vs_baseline ----------------------------------------------------------------------------

def _bn_lag(res: dict, run: dict, batch_size: int | None = None) -> dict:
    """Batch norm's first-epoch validation accuracy and its running statistics' age."""
    config = res["config"]
    return dict(first_val_acc=_array(run["val_acc"])[:, 0],
                steps=config["num_train"] // (batch_size or config["batch_size"]),
                momentum=config.get("momentum", 0.9))


def _bn_note(res: dict, run: dict, batch_size: int | None = None) -> str | None:
    return running_stats_note(**_bn_lag(res, run, batch_size))


def _bn_plot_note(res: dict, run: dict, batch_size: int | None = None) -> str | None:
    return lag_plot_note(**_bn_lag(res, run, batch_size))


def plot_bn_vs_baseline(res: dict, path: str) -> None:
    runs = {NAMES[k]: v for k, v in res["runs"].items()}
    _curves(runs, path, "Batch norm vs layer norm vs none (6-layer net; mean and min-max over "
            f"{len(res['seeds'])} seeds)", note=_bn_plot_note(res, res["runs"]["batchnorm"]))


FINAL_VAL = f"Final validation accuracy (mean of the last {LAST} epochs)"


def summarize_bn_vs_baseline(res: dict) -> Summary:
    runs = res["runs"]
    epochs = res["config"]["epochs"]
    final = {k: _final(r, "val_acc") for k, r in runs.items()}
    first_loss = {k: _epoch_loss(r, epochs, 0) for k, r in runs.items()}
    found = [
        difference(FINAL_VAL, "batch norm", final["batchnorm"], "no normalization", final["none"]),
        difference(FINAL_VAL, "layer norm", final["layernorm"], "no normalization", final["none"]),
        difference(FINAL_VAL, "batch norm", final["batchnorm"], "layer norm", final["layernorm"]),
        difference("Mean training loss over the first epoch (train mode)", "batch norm",
                   first_loss["batchnorm"], "no normalization", first_loss["none"],
                   min_effect=LOSS),
    ]
    note = _bn_note(res, runs["batchnorm"])
    return _run_rows(runs, epochs, NAMES), found, [note] if note else []


# --- weight_scale ------------------------------------------------------------------------------

def plot_weight_scale(res: dict, path: str) -> None:
    plt = _plt()
    scales = res["config"]["weight_scales"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in zip(axes, ("best_val_acc", "best_train_acc", "final_loss"),
                              ("best validation accuracy", "best train accuracy",
                               "final training loss")):
        for name in ("batchnorm", "none"):
            band(ax, scales, _array(res[name][key]), NAMES[name], marker="o", markersize=3)
        ax.set_xscale("log")
        if key == "final_loss":
            ax.set_yscale("log")
        else:
            ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("weight initialization scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path, "Sensitivity to the weight initialization scale (8-layer net; mean and "
          f"min-max over {len(res['seeds'])} seeds)")


def summarize_weight_scale(res: dict) -> Summary:
    scales = res["config"]["weight_scales"]
    header = ["run", f"scales with best val acc >= 0.5 (of {len(scales)})", "best val acc",
              "at scale (seed mean)"]
    rows, useful, best = [], {}, {}
    for name in ("batchnorm", "none"):
        accs = np.nan_to_num(_array(res[name]["best_val_acc"]), nan=-1.0)  # (S, scales)
        useful[name] = np.sum(accs >= 0.5, axis=1).astype(float)
        best[name] = accs.max(1)
        at = scales[int(np.argmax(accs.mean(0)))]
        rows.append([NAMES[name], spread(useful[name], 1), spread(best[name]), f"{at:.2g}"])
    found = [difference(f"Weight scales (of {len(scales)}, {scales[0]:.0e} to {scales[-1]:.0e}) "
                        f"whose best validation accuracy reaches 0.5", "batch norm",
                        useful["batchnorm"], "no normalization", useful["none"], min_effect=1,
                        digits=1, more="more", less="fewer"),
             difference("Best validation accuracy over the scales", "batch norm",
                        best["batchnorm"], "no normalization", best["none"])]
    notes = []
    diverged = np.sum(np.isnan(_array(res["none"]["final_loss"])), axis=1)
    if diverged.any():
        notes.append(f"Without batch norm, {spread(diverged, 1)} scales per seed ended with a "
                     f"non-finite loss.")
    return (header, rows), found, notes


# --- batch_size --------------------------------------------------------------------------------

def plot_batch_size(res: dict, path: str) -> None:
    """Small multiples: one column per normalization, one row per metric; batch sizes told apart
    by line style and marker as well as colour; the legend outside the axes."""
    plt = _plt()
    runs, sizes = res["runs"], res["config"]["batch_sizes"]
    names = ("batchnorm", "layernorm", "none")
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "d")]
    fig, axes = plt.subplots(2, len(names), figsize=(12, 6.4), sharex=True, sharey="row")
    for col, name in enumerate(names):
        for row, key in enumerate(("train_acc", "val_acc")):
            ax = axes[row, col]
            for (line, marker), bs in zip(styles, sizes):
                if f"{name}/{bs}" not in runs:  # the baseline runs at the smallest size only
                    continue
                values = _array(runs[f"{name}/{bs}"][key])
                band(ax, np.arange(1, values.shape[1] + 1), values, str(bs), linestyle=line,
                     marker=marker, markersize=4)
            ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if row == 0:
                ax.set_title(NAMES[name] + (f" (batch {min(sizes)})" if name == "none" else ""))
            else:
                ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel(key.replace("_acc", " accuracy").replace("val", "validation"))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="batch size")
    note = _bn_plot_note(res, runs[f"batchnorm/{max(sizes)}"], max(sizes))
    fig.suptitle("Batch size: batch norm vs layer norm vs none (mean and min-max over "
                 f"{len(res['seeds'])} seeds; accuracy in test mode)")
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 0.86, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize_batch_size(res: dict) -> Summary:
    runs = res["runs"]
    sizes = res["config"]["batch_sizes"]
    small, large = min(sizes), max(sizes)
    found = [difference(f"{NAMES[name].capitalize()}, {FINAL_VAL[0].lower()}{FINAL_VAL[1:]}",
                        f"batch {small}", _final(runs[f"{name}/{small}"], "val_acc"),
                        f"batch {large}", _final(runs[f"{name}/{large}"], "val_acc"))
             for name in ("batchnorm", "layernorm")]
    none = _final(runs[f"none/{small}"], "val_acc")
    notes = [f"All runs train {res['config']['epochs']} epochs, so batch {small} takes "
             f"{large // small}x the steps of batch {large}. The baseline without normalization "
             f"(batch {small}, as in the assignment) trains this deep net at weight scale "
             f"{res['config']['weight_scale']} erratically: final validation accuracy "
             f"{spread(none)}."]
    note = _bn_note(res, runs[f"batchnorm/{large}"], large)
    if note:
        notes.append(f"At batch {large}, b" + note[1:])
    return _run_rows(runs, res["config"]["epochs"]), found, notes


# --- dropout -----------------------------------------------------------------------------------

def plot_dropout(res: dict, path: str) -> None:
    config = res["config"]
    _curves({f"drop rate {k}": v for k, v in res["runs"].items()}, path,
            f"Dropout: one hidden layer of 500, {config['num_train']} examples, "
            f"{config['label_noise']:.0%} of labels random (mean and min-max over "
            f"{len(res['seeds'])} seeds)", keys=("train_acc", "val_acc"),
            note="Train accuracy is against the training labels, noisy ones included; "
                 "validation labels are clean.")


def summarize_dropout(res: dict) -> Summary:
    runs = res["runs"]
    r0, r1 = list(runs)
    header = ["drop rate", f"final train acc (last {LAST} epochs)", "final val acc",
              "train - val gap", "best val acc"]
    rows, train, val, gap, best = [], {}, {}, {}, {}
    for rate, run in runs.items():
        train[rate], val[rate] = _final(run, "train_acc"), _final(run, "val_acc")
        gap[rate] = train[rate] - val[rate]
        best[rate] = np.nanmax(_array(run["val_acc"]), 1)
        rows.append([rate, spread(train[rate]), spread(val[rate]), spread(gap[rate]),
                     spread(best[rate])])  # final = mean of the last LAST epochs
    with_rate = f"drop rate {r1}"
    found = [
        difference(f"Without dropout, final accuracy (last {LAST} epochs)", "train (noisy labels)",
                   train[r0],
                   "validation", val[r0]),
        difference(FINAL_VAL, with_rate, val[r1], "no dropout", val[r0]),
        difference(f"Final train - validation gap (last {LAST} epochs)", with_rate, gap[r1],
                   "no dropout", gap[r0], more="larger", less="smaller"),
        difference("Best validation accuracy over the epochs (early stopping)", with_rate,
                   best[r1], "no dropout", best[r0]),
    ]
    noise = res["config"]["label_noise"]
    notes = [f"{noise:.0%} of the training labels are replaced by uniformly random ones (so about "
             f"{noise * 0.9:.0%} are wrong), and the net trains {res['config']['epochs']} epochs: "
             f"without dropout it memorizes them, which is the overfitting dropout can counter. "
             f"Digits with clean labels barely overfit at this size (train 0.99, validation 0.95)."]
    return (header, rows), found, notes


# --- spatial_bn --------------------------------------------------------------------------------

def plot_spatial_bn(res: dict, path: str) -> None:
    runs = {"spatial batch norm" if k == "batchnorm" else NAMES[k]: v
            for k, v in res["runs"].items()}
    _curves(runs, path, "Conv net with and without spatial batch norm (mean and min-max over "
            f"{len(res['seeds'])} seeds)", note=_bn_plot_note(res, res["runs"]["batchnorm"]))


def summarize_spatial_bn(res: dict) -> Summary:
    runs = res["runs"]
    bn, none = runs["batchnorm"], runs["none"]
    epochs = res["config"]["epochs"]
    found = [
        difference(FINAL_VAL, "spatial batch norm", _final(bn, "val_acc"), "no normalization",
                   _final(none, "val_acc")),
        difference("Mean training loss over the first epoch (train mode)", "spatial batch norm",
                   _epoch_loss(bn, epochs, 0), "no normalization", _epoch_loss(none, epochs, 0),
                   min_effect=LOSS),
    ]
    note = _bn_note(res, bn)
    names = {"batchnorm": "spatial batch norm", "none": "no normalization"}
    return _run_rows(runs, epochs, names), found, [note] if note else []


# --- backward_speed ----------------------------------------------------------------------------

VARIANTS = ["jax_graph", "jax_alt", "jax_autodiff", "numpy_graph", "numpy_alt"]


def plot_backward_speed(res: dict, path: str) -> None:
    plt = _plt()
    rows = res["rows"]
    labels = ["x".join(map(str, r["shape"])) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.3))
    width = 0.16
    for i, v in enumerate(VARIANTS):
        ms = np.array([r["seconds"][v] for r in rows]) * 1e3  # (shapes, seeds)
        mean = ms.mean(1)
        ax.bar(np.arange(len(rows)) + (i - 2) * width, mean, width, label=v,
               yerr=[mean - ms.min(1), ms.max(1) - mean], capsize=2)
    ax.set_xticks(np.arange(len(rows)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_xlabel("shape (N, D)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path, "Batch norm forward + backward: graph vs alt vs autodiff\n(bars: mean, "
          f"whiskers: min-max over {len(res['seeds'])} seeds)")


def summarize_backward_speed(res: dict) -> Summary:
    pairs = {"numpy": "numpy_graph/numpy_alt", "jax": "jax_graph/jax_alt",
             "autodiff": "jax_autodiff/jax_alt"}
    header = ["shape"] + [f"{v} ms" for v in VARIANTS] + ["numpy graph/alt", "jax graph/alt",
                                                         "jax autodiff/alt"]
    rows = []
    for r in res["rows"]:
        rows.append(["x".join(map(str, r["shape"]))]
                    + [f"{np.mean(r['seconds'][v]) * 1e3:.3f}" for v in VARIANTS]
                    + [spread(r["ratios"][pairs[k]], 2) for k in ("numpy", "jax", "autodiff")])
    # Per seed: the median over shapes of the round-by-round ratio.
    median = {k: np.median([r["ratios"][pair] for r in res["rows"]], axis=0)
              for k, pair in pairs.items()}
    ones = np.ones_like(median["numpy"])
    found = [
        ratio("numpy, staged (graph) vs simplified (alt) backward, median over shapes", "graph",
              median["numpy"], "alt", ones),
        ratio("Jitted under XLA, graph vs alt, median over shapes", "graph", median["jax"], "alt",
              ones),
        ratio("Jitted under XLA, jax.vjp of the naive forward (autodiff) vs the hand-written alt "
              "rule, median over shapes", "autodiff", median["autodiff"], "alt", ones),
    ]
    notes = ["Times are medians of interleaved rounds (each round runs every candidate once, in "
             "turn); ratios are taken round by round, then the median over rounds and shapes. "
             "The write-ups report the simplified backward about 2x faster than the staged one "
             f"in numpy; measured here: {statistics.median(median['numpy']):.2f}x (median over "
             "seeds). Under XLA the staged graph's elementwise nodes are fused, so what is left "
             "of the difference is the extra passes over x."]
    return (header, rows), found, notes


def markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
