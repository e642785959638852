"""Ray processes that die with the ``gold-ray`` process that started them.

A local Ray started by ``ray.init`` shares the fate of its driver through the kernel (the GCS and
the raylet get ``PR_SET_PDEATHSIG``), but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) and some workers do not: after a ``kill -9`` of ``gold-ray distill`` they
were measured alive minutes later, holding ports and memory. :func:`watch` starts a small
watchdog process that remembers the starter's descendants and, when the starter dies (its end of
a pipe closes, whatever the signal), kills those still running.

Only for a Ray this process started itself: a joined cluster (``$RAY_ADDRESS``, a Ray job) is
not ours to stop.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

SCAN_S = 0.5
"""How often the watchdog refreshes its list of the starter's descendants."""


def watch(parent_pid: int | None = None) -> subprocess.Popen:
    """Start the watchdog of ``parent_pid`` (default: this process); returns the watchdog process
    once it has seen the processes ``parent_pid`` has started so far.

    The watchdog's stdin is a pipe whose write end only this process holds: end of file there
    means this process is gone. The watchdog runs in its own session, so a terminal's Ctrl-C,
    which the starter handles, does not reach it.
    """
    pid = parent_pid or os.getpid()
    # Run by path: whatever the working directory, the watchdog needs nothing but psutil.
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(pid)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)
    # It says when its first look at the descendants is done: what exists now is covered.
    proc.stdout.readline()
    proc.stdout.close()
    return proc


def _descendants(pid: int, known: dict[int, float]) -> None:
    """Add ``pid``'s living descendants to ``known`` (pid -> start time, to tell a reused pid apart)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error):
            known.setdefault(child.pid, child.create_time())


def _kill(known: dict[int, float]) -> None:
    """SIGKILL every remembered process still running as the same process (and what it started since)."""
    import psutil

    procs = []
    for pid, started in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started:
                procs.append(proc)
                procs.extend(proc.children(recursive=True))
        except psutil.Error:
            pass
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


def main(argv: list[str]) -> int:
    """The watchdog: track ``argv[0]``'s descendants until its pipe closes, then kill them."""
    parent = int(argv[0])
    me = os.getpid()
    known: dict[int, float] = {}
    stdin = sys.stdin.fileno()
    _descendants(parent, known)
    print("watching", flush=True)
    sys.stdout.close()
    while True:
        _descendants(parent, known)
        known.pop(me, None)
        ready, _, _ = select.select([stdin], [], [], SCAN_S)
        if ready and not os.read(stdin, 4096):
            break
    time.sleep(SCAN_S)  # the kernel's own fate sharing goes first; this catches the rest
    _kill(known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
