"""Reading tar streams member by member (the dataset shards `captioner ingest` writes), from a
local file or a network stream alike. Stdlib only."""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Callable, Iterator


def iter_tar_members(stream: BinaryIO, want: Callable[[str], bool] | None = None) -> Iterator:
    """(member, bytes) for each regular file of a tar stream; with `want`, only the members
    whose name it accepts are read into memory. On a seekable file (a local store) the data
    of unwanted members is seeked over, not read (tarfile's "r:" mode seeks from header to
    header); a network stream ("r|" mode) has to read past it. A caller that has what it
    needs stops iterating and reads no further."""
    seekable = want is not None and getattr(stream, "seekable", lambda: False)()
    with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tf:
        for m in tf:
            if m.isfile() and (want is None or want(m.name)):
                yield m, tf.extractfile(m).read()
