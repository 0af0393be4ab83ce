"""``python -m experiments``: the main job (for now, the batch norm training demo)."""

from experiments.demo import main

main()
