"""`python -m treeflash.cli`: the `treeflash` command (what `train features --workers` and torchrun start)."""

import sys
import warnings

from . import main

if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
