"""Canonical JSON and sha256 digests: the byte-level vocabulary of identity."""

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time when hashing files
READ_BACK_CHUNK = 8 << 20  # bytes read back at a time by FileHash
# Files hashed at once when a tree holds several large ones (sha256 and reads release the GIL):
# a sharded checkpoint's digest, which every build checks first, then takes half the time on 2 cores.
HASH_THREADS = min(4, os.cpu_count() or 1)
PARALLEL_BYTES = 64 << 20  # below this a tree is hashed in the calling thread


def canonical_json(value) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that get hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def pretty_json(value) -> str:
    """Sorted, indented JSON with a final newline: the form written for people to read."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def file_entries(root: Path, exclude: frozenset = frozenset(), known: dict | None = None) -> list:
    """Every regular file under root as {path, sha256, size}, sorted by relative POSIX path.

    known: entries already hashed (by relative path), e.g. weights hashed as they were written; each
    is used as it is (its size checked against the file), so no file is hashed twice.
    """
    known = known or {}
    relatives = [p.relative_to(root).as_posix() for p in sorted(p for p in root.rglob("*") if p.is_file())]
    todo = [relative for relative in relatives if relative not in exclude and relative not in known]
    if len(todo) > 1 and sum((root / relative).stat().st_size for relative in todo) > PARALLEL_BYTES:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(HASH_THREADS) as pool:
            hashed = dict(zip(todo, pool.map(lambda relative: file_entry(root, relative), todo)))
    else:
        hashed = {relative: file_entry(root, relative) for relative in todo}
    return [known_entry(root, known[relative]) if relative in known else hashed[relative]
            for relative in relatives if relative not in exclude]


def file_entry(root: Path, relative: str) -> dict:
    """{path, sha256, size} of one file under root."""
    path = root / relative
    return {"path": relative, "sha256": sha256_file(path), "size": path.stat().st_size}


def known_entry(root: Path, entry: dict) -> dict:
    """An entry hashed earlier, once more checked to describe a file of that size."""
    size = (root / entry["path"]).stat().st_size
    if size != entry["size"]:
        raise ValueError(f"{entry['path']}: {size} bytes on disk, {entry['size']} when it was hashed")
    return entry


class FileHash:
    """sha256 of a file whose pieces are written in any order, each byte hashed once, in file order.

    add(offset, data) after data is written at offset: a piece that continues the hashed prefix is
    hashed from memory; a piece beyond it is only noted (so its memory can go) and read back from
    the file (fd, readable) once the prefix reaches it: from the page cache, as it was just written.
    """

    def __init__(self, fd: int):
        self.fd, self.sha, self.done, self.ahead, self.buffer = fd, hashlib.sha256(), 0, {}, None

    def add(self, offset: int, data) -> None:
        if not len(data):
            return
        if offset == self.done:
            self.sha.update(data)
            self.done += len(data)
        else:
            self.ahead[offset] = offset + len(data)
        while self.done in self.ahead:
            self.read_back(self.ahead.pop(self.done))

    def read_back(self, end: int) -> None:
        if self.buffer is None:  # one buffer for every read back: fresh memory costs page faults
            self.buffer = memoryview(bytearray(READ_BACK_CHUNK))
        view = self.buffer
        while self.done < end:
            count = os.preadv(self.fd, [view[: end - self.done]], self.done)
            if count == 0:
                raise OSError(f"file ends at byte {self.done}, before the {end} written")
            self.sha.update(view[:count])
            self.done += count

    def digest(self, size: int) -> str:
        """'sha256:…' of the whole file, which must be size bytes, every one of them added."""
        if self.done != size or self.ahead:
            raise ValueError(f"hashed {self.done} of {size} bytes ({len(self.ahead)} pieces not reached)")
        return "sha256:" + self.sha.hexdigest()


def tree_digest(entries: list) -> str:
    """Digest of a file list: sha256 of the canonical JSON of its sorted (path, sha256, size) rows."""
    rows = sorted([e["path"], e["sha256"], e["size"]] for e in entries)
    return sha256_bytes(canonical_json(rows))
