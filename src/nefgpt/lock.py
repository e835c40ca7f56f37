"""One nefgpt process per run directory, enforced with ``flock`` on ``DIR/.nefgpt.lock``.

flock, not a pid file: the kernel drops the lock when its holder dies, even by
SIGKILL, so a lock file left behind by a killed run never blocks the next one.
The holder's pid is written into the file only so the refusal can name it.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import NefgptError
from .layout import LOCK_FILE


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the body; raise NefgptError at once if another process holds it."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)  # minus the umask, like every artifact
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise NefgptError(f"{run_dir} is in use by another nefgpt process (pid {pid}); "
                              "wait for it to finish or stop it, then run again") from None
        st = os.fstat(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        # Keep the file's times: a command that changes nothing leaves the run directory's mtimes as they were.
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        yield
    finally:
        os.close(fd)  # closing releases the lock
