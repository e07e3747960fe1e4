"""`python -m loramem.cli`, as the console script `loramem`."""

from loramem.cli import run

run()
