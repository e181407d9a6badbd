"""NVIDIA MPS control for the rapid topology's process placement.

Two processes on one NVIDIA GPU are time-sliced unless an MPS control daemon runs
(GPU_FACTS.md, "Two processes on one GPU"). `ensure_mps` finds a running daemon or starts a
private one (its own pipe and log directories, stopped on exit). A private daemon's directories
are under `$TMPDIR/rapidserve-mps-<server pid>-*`: a server killed before it could stop its
daemon (SIGKILL) leaves it running, and the next start stops it (`stop_orphaned_daemons`, when
that server is gone: resources/leftovers.py).

NOTE: CUDA clients find the daemon through CUDA_MPS_PIPE_DIRECTORY, read when they create
their CUDA context: it is set in this process's environment before the workers are spawned.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from rapidserve.resources.leftovers import stale_dirs, tmpdir_prefix

log = logging.getLogger("rapidserve.engine")

CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # the daemon's default when the variable is unset
MPS_MODES = ("auto", "on", "off")
_START_TIMEOUT_S = 10.0


@dataclass
class MpsDaemon:
    pipe_dir: str
    log_dir: str
    private: bool  # started by us (and so stopped by us)

    def stop(self) -> None:
        if not self.private:
            return
        if _quit(self.pipe_dir, self.log_dir):
            shutil.rmtree(os.path.dirname(self.pipe_dir), ignore_errors=True)
        self.private = False
        log.info("stopped the private MPS daemon (%s)", self.pipe_dir)


def _quit(pipe_dir: str, log_dir: str) -> bool:
    """Tell the daemon behind `pipe_dir` to quit; whether the command ran."""
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir, CUDA_MPS_LOG_DIRECTORY=log_dir)
    try:
        subprocess.run([CONTROL], input=b"quit\n", env=env, timeout=10, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not stop the MPS daemon of %s: %s", pipe_dir, e)
        return False
    return True


def stop_orphaned_daemons(root: str | None = None) -> list[str]:
    """Stop the private daemons of servers that are gone (killed before they could) and remove
    their directories; returns the pipe directories of those stopped."""
    stopped = []
    for path in stale_dirs("mps", root):
        pipe_dir, log_dir = os.path.join(path, "pipe"), os.path.join(path, "log")
        if os.path.exists(os.path.join(pipe_dir, "control")):
            if shutil.which(CONTROL) is None or not _quit(pipe_dir, log_dir):
                continue  # keep what tells the next start where it is
            log.warning("stopped an orphaned private MPS daemon (%s) of a server that is gone", pipe_dir)
            stopped.append(pipe_dir)
        shutil.rmtree(path, ignore_errors=True)
    return stopped


def running_daemon() -> MpsDaemon | None:
    """A daemon this process's CUDA clients would reach: its control pipe exists."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIR)
    if os.path.exists(os.path.join(pipe_dir, "control")):
        return MpsDaemon(pipe_dir, os.environ.get("CUDA_MPS_LOG_DIRECTORY", ""), private=False)
    return None


def start_private_daemon() -> MpsDaemon:
    """Start a daemon with its own directories and point this process's environment at it."""
    if shutil.which(CONTROL) is None:
        raise RuntimeError(f"{CONTROL} is not on the PATH")
    root = tempfile.mkdtemp(prefix=tmpdir_prefix(os.getpid(), "mps"))  # see stop_orphaned_daemons
    pipe_dir, log_dir = os.path.join(root, "pipe"), os.path.join(root, "log")
    os.makedirs(pipe_dir)
    os.makedirs(log_dir)
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir, CUDA_MPS_LOG_DIRECTORY=log_dir)
    result = subprocess.run([CONTROL, "-d"], env=env, timeout=30, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{CONTROL} -d failed ({result.returncode}): {result.stderr.decode().strip()}")
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not os.path.exists(os.path.join(pipe_dir, "control")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MPS daemon did not create its control pipe in {pipe_dir}")
        time.sleep(0.05)
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
    os.environ["CUDA_MPS_LOG_DIRECTORY"] = log_dir
    log.info("started a private MPS daemon (%s)", pipe_dir)
    return MpsDaemon(pipe_dir, log_dir, private=True)


def ensure_mps(mode: str) -> tuple[MpsDaemon | None, str | None]:
    """For process placement on NVIDIA: (the daemon to use, or None; a reason to fall back to
    thread placement, or None). `on` raises where `auto` falls back; `off` uses no daemon."""
    if mode not in MPS_MODES:
        raise ValueError(f"unknown --mps {mode!r}; available: {', '.join(MPS_MODES)}")
    if mode == "off":
        return None, None
    stop_orphaned_daemons()  # before looking: the GPU is better off without them
    daemon = running_daemon()
    if daemon is not None:
        log.info("using the running MPS daemon (%s)", daemon.pipe_dir)
        return daemon, None
    try:
        return start_private_daemon(), None
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        if mode == "on":
            raise ValueError(f"--mps on, but no MPS daemon could be started: {e}") from e
        return None, f"no MPS daemon could be started ({e}): two processes on one GPU would be time-sliced"
