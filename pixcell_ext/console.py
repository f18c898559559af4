"""What a user of the scripts sees: one sentence for a mistake, log lines without noise, progress bars only on a
terminal.

Free of torch on purpose: the scripts import it at the top, and `--help` must answer at once.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from pixcell_ext.errors import ExplainedError

USER_ERROR_EXIT_CODE = 2  # argparse's code for a bad command line; a crash exits 1
EVERY_PROCESS = logging.getLogger("pixcell_ext.every_process")
"""Lines that each process must say for itself (what share of the work it does); every other logger speaks on the
main process only."""


def run_main(parse_args: Callable[[], Any], main: Callable[[Any], None]) -> None:
    """Parse, check and run a script. An `ExplainedError` prints `error: <sentence>` on stderr and exits with status 2,
    which `accelerate launch --quiet` passes on without a traceback of its own (without `--quiet` the launcher
    still prints its `CalledProcessError`, whatever the script does)."""
    try:
        main(parse_args())
    except ExplainedError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)


def setup_logging(process_index: int, num_processes: int) -> None:
    """INFO on the main process, warnings only on the others (so nothing is said N times; `EVERY_PROCESS` excepted),
    and a rank prefix only when there are several processes to tell apart."""
    prefix = f"[rank {process_index}] " if num_processes > 1 else ""
    logging.basicConfig(
        format=f"%(asctime)s %(levelname)s %(name)s: {prefix}%(message)s",
        level=logging.INFO if process_index == 0 else logging.WARNING,
    )
    EVERY_PROCESS.setLevel(logging.INFO)
    for noisy in ("accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threading.excepthook = _quiet_about_a_full_disk


def _quiet_about_a_full_disk(hook_args: threading.ExceptHookArgs) -> None:
    """A background writer (TensorBoard's event thread) that hits a full disk dies with a traceback, and the main
    thread then reports the same full disk in one sentence naming the folder: the traceback would only bury it."""
    if isinstance(hook_args.exc_value, OSError) and hook_args.exc_value.errno == errno.ENOSPC:
        return
    threading.__excepthook__(hook_args)


def progress_bar(total: int, desc: str, *, enabled: bool = True, initial: int = 0):
    """A tqdm bar on an interactive terminal only: in a log file its carriage-return redraws make one line of
    hundreds of kB. Off a terminal the scripts log their milestones (checkpoints, classes) instead."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and sys.stderr.isatty()))
