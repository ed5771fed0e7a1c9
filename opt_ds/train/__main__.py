"""`python -m opt_ds.train`: see `opt_ds.train.main`."""

import sys

from opt_ds.train.main import main

sys.exit(main())
