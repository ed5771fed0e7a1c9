"""`python -m opt_ds.train`: see `opt_ds.train.main`. The deepspeed launcher's Slurm runner starts this file by
its path; the guard keeps spawned loader processes, which run the main script's top level as `__mp_main__`, from
starting a run of their own."""

import sys

from opt_ds.train.signals import stop_request

if __name__ == "__main__":
    stop_request()  # first: a stop signal during the imports and set-up below is answered, not fatal
    from opt_ds.train.main import main

    sys.exit(main())
