"""Training: the entry point (`main`, run as `python -m opt_ds.train`), the loop (`trainer`), what a step
computes per stage (`stages`), checkpoints (`checkpoint`), metrics and memory accounting, stop signals."""
