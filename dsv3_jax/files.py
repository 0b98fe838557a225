"""Writing files and folders so that a crash never leaves a half-written one under the real name.

  with atomic_dir(path) as tmp:    # fill tmp; on success tmp becomes path, on any error it goes
  with atomic_file(path) as f:     # write f; on success it replaces path, on any error it goes
  writable_workdir(path)           # refuses a workdir that cannot be created or written in

The temporary name lies beside `path` (same file system, so the final rename is atomic) and is
fresh for every call, so processes or hosts writing the same path never share one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import IO, Iterator


def _fresh_name(path: str) -> str:
    """A name beside `path` that no other call (in any process or host) picks."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path),
                        f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:16]}")


@contextlib.contextmanager
def atomic_dir(path: str, *, replace: bool = False) -> Iterator[str]:
    """Yields a new empty folder that becomes `path` when the block ends without an error.

    An existing empty folder at `path` is replaced; a non-empty one only with `replace=True`
    (otherwise the rename fails with OSError and nothing of it is touched). On an error the
    temporary folder is deleted and `path` is left as it was."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = _fresh_name(path)
    os.mkdir(tmp)  # the umask's permissions, as a plain mkdir would give `path`
    try:
        yield tmp
        if replace:
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO]:
    """Yields a file open for writing that replaces `path` when the block ends without an error;
    on an error it is deleted and `path` is left as it was."""
    tmp = _fresh_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def writable_workdir(path: str, *, error: type[Exception] = OSError, what: str = "workdir") -> str:
    """`path` made absolute, once it is a folder (created if missing) that a file can be created
    in; else raises `error` with a message naming `what`, the path and the cause."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise error(f"{what} {path} is not writable ({e.strerror or e}): it is not a writable "
                    "directory and cannot be made one; choose a path that can be created and "
                    "written to.") from e
    return path
