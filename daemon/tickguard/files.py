"""Small files from outside (token files, the store's install id): read safely.

A path can name anything: /dev/zero (endless), a FIFO (blocks forever on
open), a directory, a 2 GB file. `read_small` opens without blocking, reads
only regular files, and at most `limit` bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotSmallFile(OSError):
    """The path is not a regular file, or is larger than allowed."""


def read_small(path: str | Path, limit: int) -> bytes:
    """The content of the regular file at `path`, at most `limit` bytes; OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotSmallFile(0, "not a regular file", str(path))
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotSmallFile(0, f"larger than {limit} bytes", str(path))
    return data
