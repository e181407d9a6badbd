"""What a server killed before it could clean up (SIGKILL, a machine's OOM killer) leaves behind,
and how the next server's start removes it: the workers' temporary directory
(`$TMPDIR/rapidserve-<pid>-*`) and a private MPS daemon (resources/mps.py, under
`$TMPDIR/rapidserve-mps-<pid>-*`). Both are named after the server's pid, so a later start can
tell whose they are and whether that server is gone.

NOTE: "gone" is judged conservatively: its pid runs no process (or a zombie), or the process that
has the pid now started after the directory was last changed (the pid was reused: the server
that made and used the directory started before that). A process that may be the maker keeps
its directory, however old; only directories of our naming and owned by this user are touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile

log = logging.getLogger("rapidserve.engine")

_REUSE_SLACK_S = 2.0  # a process's start time is known to a clock tick plus the boot time's second


def tmpdir_prefix(pid: int, kind: str = "") -> str:
    """The name of a server's directory up to its random suffix (tempfile.mkdtemp's prefix):
    `rapidserve-<pid>-` for the workers' temporary files, `rapidserve-<kind>-<pid>-` for others."""
    return f"rapidserve-{kind}-{pid}-" if kind else f"rapidserve-{pid}-"


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, to about a second), or None if there
    is no such process (or it is a zombie: it has exited). Without /proc (not Linux) a live
    pid gives -inf: its start is unknown, so it is taken as the directory's maker."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's process: alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return float("-inf")
    if fields[0] in ("Z", "X"):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime


def stale_dirs(kind: str = "", root: str | None = None) -> list[str]:
    """The directories named `tmpdir_prefix(pid, kind)` + a suffix in `root` (default $TMPDIR)
    whose server is gone (see the module's NOTE), this process's own excepted."""
    root = root or tempfile.gettempdir()
    pattern = re.compile(re.escape(f"rapidserve-{kind}-" if kind else "rapidserve-") + r"(\d+)-[A-Za-z0-9_]+")
    out = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        started = _process_start(int(match.group(1)))
        if started is not None and started <= st.st_mtime + _REUSE_SLACK_S:
            continue  # its server may still be running
        out.append(path)
    return out


def remove_stale_tmpdirs(root: str | None = None) -> list[str]:
    """Remove the workers' temporary directories of servers that are gone; returns those removed."""
    removed = []
    for path in stale_dirs("", root):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
            log.info("removed %s, left by a server that is gone", path)
    return removed
