"""The watchdog of a locally started Ray (``actors/reaper.py``) kills what outlives its starter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]

STARTER = """
import subprocess, sys, time
from actors.reaper import watch
# A grandchild in its own session, like a Ray agent: nothing of the kernel's takes it down with us.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
watch()
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_process_the_starter_leaves_behind_is_killed_when_the_starter_is_killed_with_sigkill():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True, env=env)
    orphan = psutil.Process(int(starter.stdout.readline()))
    assert orphan.is_running()  # and the watchdog, started after it, has seen it
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()
    try:
        orphan.wait(timeout=20)
    except psutil.TimeoutExpired:
        orphan.kill()
        raise AssertionError("the starter's child outlived it by 20 s") from None

