"""`python -m tpi.worker ...` == `tpi worker ...` (used to spawn local workers)."""

import sys

from tpi.cli import cli

cli(["worker", *sys.argv[1:]], prog_name="tpi")
