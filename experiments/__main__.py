"""``python -m experiments``: every study, its plots and JSON, and REPORT.md (see run.py)."""

import sys

from experiments.run import main

sys.exit(main())
