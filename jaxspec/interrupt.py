"""Ctrl-C and SIGTERM for the `jaxspec` command: one line on stderr, exit status 130 (143).

Python's default handler raises KeyboardInterrupt in the main thread, and that goes wrong in a
process that runs XLA: raised while `import jax` runs it is a 30-line traceback; raised inside a
garbage-collection callback it is swallowed ("Exception ignored in _xla_gc_callback") and the run
goes on; while the main thread waits in a compile it is not seen until the compile ends; and
unwinding to a normal interpreter exit while XLA's compile threads still run can end in SIGSEGV
or "pure virtual method called" (2 of 9 tries). So the command installs handlers that print
`jaxspec: interrupted` and leave with `os._exit(130)`: no unwinding, no C++ destructors, and a
watcher thread woken by the signal's wakeup fd acts even while the main thread sits in C++.

Long runs with something to save (the training loop) mark the stretch with `graceful()` and call
`check()` at safe points: there the signal raises KeyboardInterrupt at the next `check()`, the
run saves its checkpoint and the command exits the same way; if no `check()` comes within
GRACE_S seconds (a compile, an evaluation), or a second signal arrives, it exits at once.

Only the command line installs these (`install()`); imported as a library, jaxspec leaves
signals to the program (KeyboardInterrupt as usual, `check()` does nothing).

This module imports nothing heavy: the command installs it before it imports jax.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import select
import signal
import sys
import threading
import time

EXITS = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
GRACE_S = 5.0
FLUSH_S = 0.5  # the most the exit waits for buffered output to flush
HANDOVER_S = 2.0  # the most a thread waits for another that took the exit first

_installed = False
_requested: int | None = None  # the first signal received
_graceful = 0  # > 0 inside graceful() stretches
_exit_lock = threading.Lock()
_exiting: int | None = None  # the thread in exit_now


def installed() -> bool:
  return _installed


def requested() -> int | None:
  """The signal number received (SIGINT or SIGTERM), or None."""
  return _requested


def install() -> None:
  """Installs the handlers and the watcher thread (main thread only; once per process)."""
  global _installed
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  r, w = os.pipe()
  os.set_blocking(w, False)
  for s in EXITS:
    signal.signal(s, _on_signal)
  signal.set_wakeup_fd(w, warn_on_full_buffer=False)
  threading.Thread(target=_watch, args=(r,), daemon=True, name="jaxspec-signals").start()
  _installed = True


def _note(signum: int) -> None:
  global _requested
  if _requested is None:
    _requested = signum


_handled = 0  # signals seen by _on_signal (each one also reaches the watcher, which counts its own)


def _on_signal(signum, frame) -> None:
  """Runs in the main thread between bytecodes (never while it waits in C++)."""
  global _handled
  _note(signum)
  _handled += 1
  if not _graceful or _handled > 1:
    exit_now(signum)
  # graceful: the next check() raises KeyboardInterrupt; the watcher enforces GRACE_S.


def _watch(fd: int) -> None:
  """Woken through the wakeup fd, whatever the main thread is doing. Should anything in it
  fail, the process still ends: a dead watcher would leave signals to the main thread alone,
  which cannot act while it waits in C++."""
  try:
    _watch_loop(fd)
  except BaseException:  # noqa: BLE001
    exit_now(_requested)


def _watch_loop(fd: int) -> None:
  deadline, sig = None, None
  while True:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:  # the grace period ran out without the main thread reaching check()
      exit_now(sig)
    for signum in os.read(fd, 64):
      if signum not in EXITS:
        continue
      _note(signum)
      if not _graceful or deadline is not None:  # nothing to save, or a second signal
        exit_now(signum)
      sig, deadline = signum, time.monotonic() + GRACE_S


@contextlib.contextmanager
def graceful():
  """A stretch of work that calls check() often and has something to save on the way out."""
  global _graceful
  _graceful += 1
  try:
    yield
  finally:
    _graceful -= 1


def check() -> None:
  """At a safe point of a graceful() stretch: KeyboardInterrupt once a signal has arrived."""
  if _installed and _requested is not None:
    raise KeyboardInterrupt


def _progress_bar_open() -> bool:
  """Whether a tqdm bar may have left stderr mid-line."""
  std = sys.modules.get("tqdm.std")
  try:
    return bool(std and len(std.tqdm._instances))
  except Exception:  # noqa: BLE001 (the set may change under us)
    return True


def _flush_stdout() -> None:
  """Flushes what was printed (stdout and stderr) for at most FLUSH_S, without hanging on a
  stalled pipe or on a lock held by the thread we interrupted: the flush runs in a bare
  `_thread` (no `threading` bookkeeping, whose locks the interrupted thread may hold), and if
  no thread can be started the output is left as it is."""
  done = _thread.allocate_lock()
  done.acquire()

  def flush():
    try:
      for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
          f.flush()
    finally:
      done.release()
  try:
    _thread.start_new_thread(flush, ())
  except Exception:  # noqa: BLE001 (no thread to spare: exit without flushing)
    return
  done.acquire(timeout=FLUSH_S)


def exit_now(signum: int | None = None) -> None:
  """Prints `jaxspec: interrupted` (or `terminated`) on its own line and ends the process with
  128 + the signal number, at once (os._exit: no unwinding through XLA). Never waits for
  long: if another thread took the exit first and has not ended the process within
  HANDOVER_S (it may be stuck, or gone), this one ends it."""
  if signum not in EXITS:
    signum = _requested if _requested in EXITS else signal.SIGINT
  global _exiting
  if _exit_lock.acquire(blocking=False):
    _exiting = threading.get_ident()
    _flush_stdout()
  elif _exiting == threading.get_ident():  # a second signal while this thread exits: go on
    return
  else:  # another thread is on its way out; should it be stuck (or gone), end it from here
    _exit_lock.acquire(timeout=HANDOVER_S)
  code, word = EXITS[signum]
  line = ("\n" if _progress_bar_open() else "") + f"jaxspec: {word}\n"
  with contextlib.suppress(OSError):
    os.write(2, line.encode())
  os._exit(code)
