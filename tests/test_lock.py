import os
import subprocess
import sys
import time

import pytest

from pipeline.errors import OutputError
from pipeline.lock import OutputLock

HOLD = """
import sys, time
from pathlib import Path
from pipeline.lock import OutputLock
lock = OutputLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_in_subprocess(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "out.lock"
    proc = hold_in_subprocess(path)
    try:
        with pytest.raises(OutputError) as err:
            OutputLock(path).acquire()
        assert f"pid {proc.pid}" in str(err.value) and "started" in str(err.value)
        assert err.value.exit_code == 2
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    path = tmp_path / "out.lock"
    proc = hold_in_subprocess(path)
    proc.kill()  # SIGKILL: no cleanup ran
    proc.wait()
    with OutputLock(path):
        assert str(os.getpid()) in path.read_text()


def test_wait_blocks_until_released(tmp_path):
    path = tmp_path / "out.lock"
    proc = hold_in_subprocess(path)
    started = time.monotonic()
    import threading

    threading.Timer(0.5, proc.kill).start()
    with OutputLock(path, wait=True, poll_seconds=0.05):
        assert time.monotonic() - started >= 0.4
    proc.wait()


def test_wait_gives_up_after_wait_seconds_naming_the_holder(tmp_path):
    path = tmp_path / "out.lock"
    proc = hold_in_subprocess(path)
    try:
        with pytest.raises(OutputError) as err:
            OutputLock(path, wait=True, poll_seconds=0.05, wait_seconds=0.2).acquire()
        assert "after waiting 0.2 s" in str(err.value) and f"pid {proc.pid}" in str(err.value)
        assert err.value.exit_code == 2
    finally:
        proc.kill()
        proc.wait()


def test_the_published_state_is_read_while_held_and_known_stale_after(tmp_path):
    from pipeline.lock import read_lock

    path = tmp_path / "out.lock"
    lock = OutputLock(path)
    lock.acquire()
    lock.publish({"run": {"run_id": "r-" + "x" * 500}})
    lock.publish({"run": {"run_id": "r-short"}})  # shorter: padded, still one valid document
    held, doc = read_lock(path)  # flock is per open file: a probe from this process sees it too
    assert held is True and doc["run"]["run_id"] == "r-short" and doc["pid"] == os.getpid()
    lock.release()
    held, doc = read_lock(path)
    assert held is False and doc["run"]["run_id"] == "r-short"  # history: nobody holds it
