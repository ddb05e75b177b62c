"""Local files written so that a crash or a concurrent reader never sees a partial result:
`atomic_write` (a hidden temp file in the same folder, fsync, rename), `atomic_copy`, and
`replace_folder`, which puts a finished folder in place of an existing one in one step where
the kernel can. `sha256_file` hashes a file in chunks. Stdlib only."""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import uuid
from pathlib import Path

TMP_PREFIX = ".tmp-"  # hidden temp files; stores skip them when listing and remove them in cleanup


def atomic_write(dst: str | Path, write, prefix: str = TMP_PREFIX) -> None:
    """Write a local file through a hidden temp file in the same folder + fsync + rename,
    so a crash never leaves a partial file under the final name."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    while True:  # not mkstemp: it creates 0600 files; O_EXCL + 0666 lets the umask decide, as for open()
        tmp = dst.parent / f"{prefix}{dst.name}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    def copy(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
    atomic_write(dst, copy)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sibling_folder(final: Path, tag: str) -> Path:
    """A new hidden folder beside `final` (same file system, so it can be renamed onto it)."""
    p = final.with_name(f".{final.name}.{tag}-{uuid.uuid4().hex[:8]}")
    p.mkdir()  # the process umask applies, as for the folder's other files
    return p


def replace_folder(new: Path, final: Path) -> None:
    """Put the finished folder `new` at `final`. An existing `final` is swapped with `new` in one
    step where the kernel can (Linux renameat2 RENAME_EXCHANGE), else renamed aside just before
    `new` is renamed in; the old one is deleted only after the new one is in place."""
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old folder
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 with RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
