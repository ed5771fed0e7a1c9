"""Benchmarks: one module per kind (see `registry`), the plain-loop reference (`plain`), real runs (`runs`),
records and plots; `python -m opt_ds.bench KIND` runs one."""
