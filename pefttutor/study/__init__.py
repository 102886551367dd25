"""The study: every method trained to convergence under one protocol (`pefttutor.protocol`), one
JSON per run under `results/`, a summary in `results/README.md`. Run it with `make study`
(`python -m pefttutor.study --help`); experiments are configs in `experiments.py`."""
