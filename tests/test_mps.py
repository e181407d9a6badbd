"""MPS control with a stand-in for nvidia-cuda-mps-control (the real one needs an NVIDIA GPU)."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from rapidserve.resources import mps

FAKE = """#!/bin/sh
if [ "$1" = "-d" ]; then
  [ -n "$FAIL" ] && { echo "cannot start" >&2; exit 1; }
  touch "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0
fi
read cmd
[ "$cmd" = "quit" ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / mps.CONTROL
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    # No daemon running where this process would look; restored after the test.
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-daemon"))
    monkeypatch.setenv("CUDA_MPS_LOG_DIRECTORY", str(tmp_path / "no-daemon-log"))
    return exe


def test_auto_starts_a_private_daemon_and_stops_it(fake_control):
    daemon, why_not = mps.ensure_mps("auto")
    assert why_not is None and daemon is not None and daemon.private
    control = os.path.join(daemon.pipe_dir, "control")
    assert os.path.exists(control)
    assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == daemon.pipe_dir  # seen by spawned workers
    daemon.stop()
    assert not os.path.exists(control)
    daemon.stop()  # idempotent


def test_a_running_daemon_is_used_and_left_alone(fake_control, tmp_path, monkeypatch):
    pipe = tmp_path / "shared-pipe"
    pipe.mkdir()
    (pipe / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
    daemon, why_not = mps.ensure_mps("on")
    assert daemon is not None and not daemon.private and daemon.pipe_dir == str(pipe)
    daemon.stop()
    assert (pipe / "control").exists()


def test_failures_fall_back_or_raise(fake_control, monkeypatch):
    monkeypatch.setenv("FAIL", "1")
    daemon, why_not = mps.ensure_mps("auto")
    assert daemon is None and "cannot start" in why_not and "time-sliced" in why_not
    with pytest.raises(ValueError, match="--mps on"):
        mps.ensure_mps("on")
    assert mps.ensure_mps("off") == (None, None)


def test_no_control_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    daemon, why_not = mps.ensure_mps("auto")
    assert daemon is None and "not on the PATH" in why_not
    with pytest.raises(ValueError, match="unknown --mps"):
        mps.ensure_mps("sometimes")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _daemon_dir(root, pid: int, suffix: str):
    d = root / f"rapidserve-mps-{pid}-{suffix}"
    (d / "pipe").mkdir(parents=True)
    (d / "log").mkdir()
    (d / "pipe" / "control").touch()
    return d


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_servers_daemon_is_stopped_at_the_next_start(fake_control, tmp_path, monkeypatch):
    """A private daemon whose server is gone (SIGKILLed before it could stop it) is told to quit
    and its directories removed when the next server looks for a daemon; one of a live server
    is left alone."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        orphan = _daemon_dir(tmp_path, _dead_pid(), "ab1")
        other = _daemon_dir(tmp_path, live.pid, "cd2")
        daemon, why_not = mps.ensure_mps("auto")
        assert why_not is None and daemon.private
        assert not orphan.exists()  # quit (the stand-in removed its control pipe), then removed
        assert (other / "pipe" / "control").exists()
        assert os.path.basename(os.path.dirname(daemon.pipe_dir)).startswith(f"rapidserve-mps-{os.getpid()}-")
        daemon.stop()
        assert not os.path.exists(os.path.dirname(daemon.pipe_dir))
    finally:
        live.kill()
        live.wait()


_KILLED_SERVER = """
from rapidserve.resources import mps
print(mps.start_private_daemon().pipe_dir, flush=True)
import time; time.sleep(60)
"""


@pytest.mark.gpu
def test_a_real_orphaned_daemon_is_stopped(tmp_path):
    """The real daemon (GPU machines): started by a process that is then SIGKILLed, stopped by
    stop_orphaned_daemons."""
    if shutil.which(mps.CONTROL) is None:
        pytest.skip(f"{mps.CONTROL} is not on the PATH")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-c", _KILLED_SERVER], stdout=subprocess.PIPE, text=True, env=env)
    pipe_dir = server.stdout.readline().strip()
    server.kill()
    server.wait()
    assert os.path.exists(os.path.join(pipe_dir, "control"))
    assert mps.stop_orphaned_daemons(str(tmp_path)) == [pipe_dir]
    assert not os.path.exists(os.path.dirname(pipe_dir))

    def still_running() -> list[str]:
        out = subprocess.run(["pgrep", "-u", str(os.getuid()), "-f", "nvidia-cuda-mps"], capture_output=True, text=True)
        left = []
        for pid in out.stdout.split():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if pipe_dir.encode() in f.read():
                        left.append(pid)
            except OSError:
                pass
        return left

    deadline = time.monotonic() + 10
    while still_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not still_running(), "the orphaned daemon still runs"
