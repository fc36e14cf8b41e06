"""The end of a distributed process: exit code 0 after a success, non-zero with the traceback after
a failure, and no abort in between.

Why returning from ``main`` is not enough (torch 2.13, gloo, Python 3.11): gloo runs collectives on
worker threads (``pt_gloo_runloop``) that release a finished work, and with it their references
to its tensors, only after the caller's ``wait()`` has returned; releasing a tensor that has a
Python object takes the GIL. While the main thread runs on, holding the GIL, the worker waits for
it; if the main thread runs into the interpreter's finalization first, the worker gets the GIL too
late: a finalizing interpreter ends any other thread that asks for it (``pthread_exit``), and that
unwinding through gloo's ``noexcept`` work destructor calls ``std::terminate``. The rank dies with
"terminate called without an active exception" (SIGABRT) and torchrun reports the run as failed
after training succeeded (pytorch/pytorch#190489).

``dist.barrier()`` does not prevent it: the barrier's own work holds the works before it and is
released the same late way. ``dist.destroy_process_group()`` prevents it only where nothing else
holds the group (it then joins gloo's threads); a DDP module, a user's reference to the group,
DeepSpeed and Megatron hold it, and gloo's threads live on. Measured at 2 ranks (5 all-reduces,
the group held, 20 torchrun runs each): no teardown 7 aborts, destroy 7, barrier + destroy 6,
this module's ending 0.

So :func:`run_and_exit` leaves with ``os._exit``, skipping the finalization, the one place the
abort happens. Before that a rank that succeeded barriers (every rank is done) and destroys the
process group, joins its own Python threads, stops its multiprocessing helpers, runs the atexit
handlers and flushes stdout and stderr. What it does not do, unlike a normal exit: flush files the
program left open (close or flush them; ``logging`` handlers are flushed by its atexit handler). A
rank that failed prints its traceback, skips the barrier (its peers would wait for it in vain: the
launcher stops them) and exits 1.

No import from marsm_dist: any floor of the package, the demo and the recipes can use it.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist

__all__ = ["exit_code", "exit_process", "leave_process_group", "print_exception", "run_and_exit"]

THREAD_JOIN_SECONDS = 60.0  # at most this long for the process's own non-daemon threads, in all


def leave_process_group(ok: bool) -> bool:
    """Barrier (only if this rank ``ok``) and destroy the default process group and its sub-groups.

    Returns False, after printing why, if the teardown failed (a peer already gone: nothing is left
    to synchronize with). Nothing to do, and True, when no process group is initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    try:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
    except Exception as err:
        print(f"process-group teardown failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return False
    return True


def _join_threads(seconds: float) -> None:
    """Wait for this process's non-daemon Python threads, as the interpreter's own exit would, but
    no longer than ``seconds`` in all (a thread that never ends must not hang the rank)."""
    deadline = time.monotonic() + seconds
    skip = (threading.current_thread(), threading.main_thread())
    for thread in threading.enumerate():
        if thread in skip or thread.daemon or not thread.is_alive():
            continue
        thread.join(max(0.0, deadline - time.monotonic()))


def _stop_children() -> None:
    """Stop this process's multiprocessing children (Megatron's checkpoint writer starts a manager
    process; DataLoader workers): ``os._exit`` would leave them running, holding the launcher's
    pipes open."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(5)


def exit_process(code: int) -> NoReturn:
    """Leave the process now with exit code ``code``, without the interpreter's finalization.

    Everything else a normal exit does is done first: non-daemon threads joined, multiprocessing
    children stopped, atexit handlers run (not in a multiprocessing child, which never runs them:
    they were registered by its parent), stdout and stderr flushed."""
    try:
        _join_threads(THREAD_JOIN_SECONDS)
        _stop_children()
        if multiprocessing.parent_process() is None:
            atexit._run_exitfuncs()  # prints a failing handler's traceback itself, as a normal exit does
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken stream: nothing more to say there
                pass
        os._exit(code)


def print_exception() -> None:
    """Print the exception being handled as an uncaught one would be: through ``sys.excepthook``
    (torch's, once a process group exists, puts ``[rankN]:`` before every line)."""
    try:
        sys.excepthook(*sys.exc_info())
    except BaseException:
        traceback.print_exc()


def exit_code(stop: SystemExit) -> int:
    """The exit code the interpreter would give for ``SystemExit(stop.code)``, printing a message
    code as it would (argparse's ``--help`` and usage errors, ``sys.exit("reason")``)."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def run_and_exit(main: Callable[[], object], on_exit: Callable[[bool], None] | None = None) -> NoReturn:
    """Run ``main()``, leave the process group, and leave the process; never returns.

    The exit code: ``main``'s return value if it is an int (as ``sys.exit(main())`` would give), else
    0; a ``SystemExit``'s code; 1 after any other exception, whose traceback is printed.
    ``on_exit(ok)`` runs after the process group is gone (e.g. ``MPI.Finalize`` or ``Abort``)."""
    code = 1
    try:
        result = main()
        code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    except SystemExit as stop:
        code = exit_code(stop)
    except BaseException:
        print_exception()
    try:
        leave_process_group(code == 0)
        if on_exit is not None:
            on_exit(code == 0)
    finally:
        exit_process(code)
