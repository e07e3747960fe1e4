"""`loramem`: the command line, thin over the library (parse, call one library function, print).

One file per command group: write.py (write, ask, inspect, export, demo), bench.py, exp.py (studies and their
report), serve.py; options.py builds the settings' options from the dataclasses in loramem.config.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from loramem.errors import LoramemError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Store knowledge in LoRA modules and ask it back.")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress (each epoch's loss and "
                                          "recall) to stderr")):
    if verbose:
        logging.getLogger("loramem").setLevel(logging.INFO)


# Commands that only read and print, done: the console script's process may end without the interpreter's
# teardown, which takes ~0.6 s of a 2 s `loramem ask` on a 2-core CPU (freeing torch's modules one by one).
skip_teardown: list[str] = []


from loramem.cli import write, serve, bench, exp  # noqa: E402, F401, I001  (the commands register on app, in this order)


def run() -> None:
    """The console script `loramem` (and `python -m loramem.cli`): `main`, then, after a command that only read
    and printed, the end of the process at once. (`main` itself returns, for callers in the same process.)"""
    main()
    if skip_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except LoramemError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise
