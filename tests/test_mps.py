"""MPS control with a stand-in for nvidia-cuda-mps-control (the real one needs an NVIDIA GPU)."""

import os
import stat

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
