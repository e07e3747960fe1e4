"""`loramem ARGS` run as a user runs it: a subprocess, its output and exit code (tests/cli, test_capacity)."""

import os
import subprocess
import sys


def loramem(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "loramem.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
