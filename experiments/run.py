"""``python -m experiments``: run the studies, write one PNG and one JSON per study, and REPORT.md.

Options: ``--only NAME`` (repeatable), ``--quick`` (reduced, for smoke tests), ``--seed``,
``--out DIR`` (default ``experiments/results``), ``--data digits|cifar10`` with ``--data-dir``,
``--no-progress``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

from experiments import backward_speed, report, studies
from experiments.data import load_cifar10, load_digits

STUDIES = {
    "bn_vs_baseline": ("Batch norm vs layer norm vs no normalization", studies.bn_vs_baseline),
    "weight_scale": ("Weight initialization scale", studies.weight_scale),
    "batch_size": ("Batch size", studies.batch_size),
    "dropout": ("Dropout as a regularizer", studies.dropout),
    "spatial_bn": ("Spatial batch norm in a conv net", studies.spatial_bn),
    "backward_speed": ("Speed of the two backward derivations", None),
}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=list(STUDIES), metavar="NAME",
                        help=f"run only this study (repeatable): {', '.join(STUDIES)}")
    parser.add_argument("--quick", action="store_true", help="reduced settings, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--data-dir", help="directory of the CIFAR-10 python batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data == "cifar10":
        if not args.data_dir:
            print("--data cifar10 needs --data-dir PATH (the cifar-10-batches-py directory).",
                  file=sys.stderr)
            return 2
        try:
            data = load_cifar10(args.data_dir)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        data = load_digits(args.seed)
    os.makedirs(args.out, exist_ok=True)
    ctx = studies.Context(data, quick=args.quick, seed=args.seed,
                          progress=False if args.no_progress else None)
    names = args.only or list(STUDIES)
    sections = []
    for name in names:
        title, fn = STUDIES[name]
        print(f"[{name}] {title} ...", flush=True)
        start = time.perf_counter()
        res = backward_speed.run(args.quick, args.seed) if fn is None else fn(ctx)
        res["seconds"] = time.perf_counter() - start
        res["data"] = args.data
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=1)
        getattr(report, f"plot_{name}")(res, os.path.join(args.out, f"{name}.png"))
        table, findings = getattr(report, f"summarize_{name}")(res)
        for line in findings:
            print(f"  - {line}")
        print(f"  ({res['seconds']:.1f} s)", flush=True)
        sections.append((name, title, res, table, findings))
    write_report(args, sections)
    print(f"wrote {os.path.join(args.out, 'REPORT.md')}")
    return 0


def write_report(args, sections) -> None:
    command = "python -m experiments " + " ".join(sys.argv[1:]) if sys.argv[1:] else \
        "python -m experiments"
    lines = ["# jaxbn experiments report", "",
             f"- Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}`",
             f"- Machine: {platform.platform()}, {os.cpu_count()} CPU(s), Python "
             f"{platform.python_version()}",
             f"- Data: {args.data}; seed {args.seed}; {'quick (reduced) settings' if args.quick else 'full settings'}",
             "- Every finding below is computed from the numbers in the study's JSON file.", ""]
    for name, title, res, table, findings in sections:
        config = ", ".join(f"{k}={report.format_value(v)}" for k, v in res["config"].items()
                           if k not in ("weight_scales",))
        lines += [f"## {title} (`{name}`)", "", f"Settings: {config}.", "",
                  f"![{name}]({name}.png)", "", report.markdown_table(table), "", "Findings:", ""]
        lines += [f"- {line}" for line in findings]
        lines += ["", f"Raw numbers: [`{name}.json`]({name}.json); took {res['seconds']:.1f} s.", ""]
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write("\n".join(lines))
