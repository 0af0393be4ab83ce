"""``python -m experiments``: run the studies, write one PNG and one JSON per study, and REPORT.md.

Options: ``--only NAME`` (repeatable), ``--quick`` (reduced, for smoke tests), ``--seed S`` and
``--seeds K`` (every study runs the K seeds K*S .. K*S + K - 1, default K = 5: --seed 0, 1, 2 are
independent replications), ``--out DIR`` (default ``experiments/results``), ``--data
digits|cifar10`` with ``--data-dir``, ``--no-progress``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

from experiments import backward_speed, findings, report, studies
from experiments.data import load_cifar10, load_digits
from experiments.seeds import seed_block

STUDIES = {
    "bn_vs_baseline": ("Batch norm vs layer norm vs no normalization", studies.bn_vs_baseline),
    "weight_scale": ("Weight initialization scale", studies.weight_scale),
    "batch_size": ("Batch size", studies.batch_size),
    "dropout": ("Dropout as a regularizer", studies.dropout),
    "spatial_bn": ("Spatial batch norm in a conv net", studies.spatial_bn),
    "backward_speed": ("Speed of the two backward derivations", None),
}
DIGITS_VAL = 547  # 1797 digits = 1000 train + 547 validation + 250 test
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=list(STUDIES), metavar="NAME",
                        help=f"run only this study (repeatable): {', '.join(STUDIES)}")
    parser.add_argument("--quick", action="store_true", help="reduced settings, for smoke tests")
    parser.add_argument("--seed", type=int, default=0,
                        help="block of seeds: K*SEED .. K*SEED + K - 1 (K from --seeds)")
    parser.add_argument("--seeds", type=int, default=5, metavar="K",
                        help="seeds per setting (at least 2; default 5)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data-dir", help="directory of the CIFAR-10 python batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seeds < 2 or args.seed < 0:
        print("--seeds must be at least 2 (a spread needs two seeds) and --seed at least 0.",
              file=sys.stderr)
        return 2
    # The studies' layers are tiny (at most 50 x 100 per model); the native kernels start
    # threads on each call, which at these sizes costs more than the work, so one thread.
    os.environ.setdefault("JAXBN_NUM_THREADS", "1")
    seeds = seed_block(args.seed, args.seeds)
    if args.data == "cifar10":
        if not args.data_dir:
            print("--data cifar10 needs --data-dir PATH (the cifar-10-batches-py directory).",
                  file=sys.stderr)
            return 2
        try:
            splits = [load_cifar10(args.data_dir)]
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        # 1000 training examples (the notebook's num_train), the rest but the test split for
        # validation: 547 images, so that one image is 0.002 of accuracy.
        splits = [load_digits(s, num_val=DIGITS_VAL) for s in seeds]
    os.makedirs(args.out, exist_ok=True)
    ctx = studies.Context(splits, seeds, quick=args.quick, shared=args.data == "cifar10",
                          progress=False if args.no_progress else None)
    names = args.only or list(STUDIES)
    sections = []
    for name in names:
        title, fn = STUDIES[name]
        print(f"[{name}] {title} ...", flush=True)
        start = time.perf_counter()
        res = backward_speed.run(args.quick, seeds) if fn is None else fn(ctx)
        res["seconds"] = time.perf_counter() - start
        res["data"] = args.data
        getattr(report, f"plot_{name}")(res, os.path.join(args.out, f"{name}.png"))
        table, found, notes = getattr(report, f"summarize_{name}")(res)
        res["findings"], res["notes"] = [f.to_json() for f in found], notes
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=1)
        for finding in found:
            print(f"  - {finding.text}")
        print(f"  ({res['seconds']:.1f} s)", flush=True)
        sections.append((name, title, res, table, found, notes))
    write_report(args, seeds, sections)
    print(f"wrote {os.path.join(args.out, 'REPORT.md')}")
    return 0


def write_report(args, seeds, sections) -> None:
    command = "python -m experiments " + " ".join(sys.argv[1:]) if sys.argv[1:] else \
        "python -m experiments"
    lines = ["# jaxbn experiments report", "",
             f"- Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}`",
             f"- Machine: {platform.platform()}, {os.cpu_count()} CPU(s), Python "
             f"{platform.python_version()}",
             f"- Data: {args.data}; seeds {', '.join(map(str, seeds))} (block {args.seed} of "
             f"{args.seeds} seeds; each seed draws the data split, the initial weights, the "
             f"shuffling and the dropout masks); "
             f"{'quick (reduced) settings' if args.quick else 'full settings'}",
             "- Every finding below is computed from the numbers in the study's JSON file. "
             "Plots show the mean over the seeds as a line and their range (min to max) as a "
             "band.", "", f"**When a difference is a finding.** {findings.RULE}", ""]
    for name, title, res, table, found, notes in sections:
        config = ", ".join(f"{k}={report.format_value(v)}" for k, v in res["config"].items()
                           if k not in ("weight_scales",))
        lines += [f"## {title} (`{name}`)", "", f"Settings: {config}.", "",
                  f"![{name}]({name}.png)", "", report.markdown_table(table), "", "Findings:", ""]
        lines += [f"- {finding.text}" for finding in found]
        if notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
        lines += ["", f"Raw numbers: [`{name}.json`]({name}.json); took {res['seconds']:.1f} s.",
                  ""]
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write("\n".join(lines))
