"""The `q4c` command line: compile, inspect, run, passes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import click

from q4c.errors import Q4cError

_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class _Q4cGroup(click.Group):
    """Turns user-fixable errors into one line and exit 1; internal errors too, unless -vv."""

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        with _terminate_cleanly():
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except Q4cError as e:
            raise click.ClickException(str(e)) from e
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # stdout closed early (`q4c inspect m.onnx | head`): not an error worth a message.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(0) from None
        except Exception as e:
            if logging.getLogger("q4c").isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(
                f"internal error ({type(e).__name__}: {e}); this is a q4c bug: rerun with -vv for the traceback and report it"
            ) from e


class _Terminated(SystemExit):
    """SIGTERM: unwinds like Ctrl-C so temporary files are removed (atomic_write), exit 143."""


@contextlib.contextmanager
def _terminate_cleanly():
    """While a command runs, SIGTERM raises instead of killing the process outright (Python's
    default), so no partial output or temporary file survives `kill` or a CI timeout."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):  # noqa: ARG001
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def configure_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose >= 2 else "%(message)s"))
    root = logging.getLogger("q4c")
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[min(verbose, 2)])
    root.propagate = False


@click.group(cls=_Q4cGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="-v: one line per pass; -vv: rewrite decisions and tracebacks.")
@click.version_option(package_name="q4c")
def main(verbose: int) -> None:
    """q4c compiles FP32 ONNX speech models (LSTM/GRU acoustic models, RNN-T, Conformer,
    LSTM and Transformer LMs) into 4-bit and mixed-precision ONNX models for ONNX Runtime.

    \b
    Start here:
      q4c compile model.onnx                 # -> model.q4.onnx, 4-bit weights
      q4c inspect model.q4.onnx              # what is inside, bytes by bit width
      q4c run model.q4.onnx --data x.npz -o y.npz

    Results go to stdout (a table, or JSON with --json); progress and logs to stderr.
    Exit codes: 0 ok, 1 error (one line on stderr), 2 bad usage, 3 'diff' over --tolerance,
    4 'compile --strict' measured lost quality.
    """
    configure_logging(verbose)


def _register() -> None:
    from q4c.cli import bench as bench_mod
    from q4c.cli import compile as compile_mod
    from q4c.cli import diff as diff_mod
    from q4c.cli import inspect as inspect_mod
    from q4c.cli import passes as passes_mod
    from q4c.cli import run as run_mod

    main.add_command(compile_mod.compile_cmd)
    main.add_command(diff_mod.diff_cmd)
    main.add_command(bench_mod.bench_cmd)
    main.add_command(inspect_mod.inspect_cmd)
    main.add_command(run_mod.run_cmd)
    main.add_command(passes_mod.passes_cmd)


_register()
