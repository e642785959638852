"""Run the test suite as two pytest processes side by side: ``make test`` calls this.

- ``ray``: the tests that use the session's Ray cluster, one after another (one Ray at a time
  in that process, the cluster shared, as in one pytest process);
- ``others``: every other test, the ``own_ray`` ones included: they run Ray in processes of
  their own (a ``gold-ray`` CLI run, ``ray start``), which the session's cluster does not disturb.

On two cores the Ray tests spend about a third of their time waiting (Ray's start-ups, gates,
grace periods), which the other process fills. Each process plans its faults in a folder of its
own (``tests/conftest.py``), so a fault planned in one never fires in the other. The multi-node
test stays in the Ray part and runs last there (``tests/conftest.py``): beside two other busy
processes, its run once did not finish within 600 s after losing its scorer node.

Usage::

    python tests/split_run.py [PYTEST_ARGS ...]

The arguments go to both processes. With a ``-m`` among them (a selection of your own), one
plain pytest runs instead. Each process's output is printed whole when it ends, the first to end
first, and kept in ``.cache/test-logs/``. Exit status: 0 when both parts passed (a part with no
test selected counts as passed: pytest's exit 5), else the first non-zero status of a part that failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / ".cache" / "test-logs"
PARTS = {"ray": "ray and not own_ray", "others": "not ray or own_ray"}
"""Each part's name (its log file) and its marker expression."""
NO_TESTS = 5
"""pytest's exit status when it collected no test."""


def part_status(code: int) -> int:
    """A part's status for the whole run: no test selected is not a failure."""
    return 0 if code == NO_TESTS else code


def run_status(codes: list[int]) -> int:
    """The whole run's exit status from its parts' pytest exit statuses."""
    return next((c for c in map(part_status, codes) if c != 0), 0)


def main(argv: list[str], log_dir: Path = LOG_DIR) -> int:
    """Run the parts (or one plain pytest when ``argv`` selects by marker); returns the exit status.

    Args:
        argv: pytest arguments, given to both parts.
        log_dir: Where each part's output is written (``<part>.log``).
    """
    pytest = [sys.executable, "-m", "pytest"]
    if any(a.startswith("-m") for a in argv):  # -m EXPR or -mEXPR: a marker selection of one's own
        return part_status(subprocess.call([*pytest, *argv]))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs = {}
    for name, marker in PARTS.items():
        log = (log_dir / f"{name}.log").open("w", encoding="utf-8")
        procs[name] = (subprocess.Popen([*pytest, "-m", marker, *argv], stdout=log, stderr=subprocess.STDOUT), log)
    codes = []
    try:
        pending = dict(procs)
        while pending:
            for name, (proc, log) in list(pending.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del pending[name]
                codes.append(proc.returncode)
                elapsed = time.monotonic() - started
                print(f"===== tests marked {PARTS[name]!r}: pytest exited {proc.returncode} after {elapsed:.0f} s "
                      f"(log: {log_dir / name}.log) =====", flush=True)
                sys.stdout.write((log_dir / f"{name}.log").read_text(encoding="utf-8"))
                sys.stdout.flush()
            time.sleep(0.5)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
    return run_status(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
