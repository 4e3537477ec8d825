"""A source folder's pinned digest, checked from the bytes the build reads as it reads them: each
weight file is hashed once, by the build's own read, instead of by a read of its own before the build.

    digest = StreamedDigest(path, pinned, refusal)   # refusal(actual) -> the Problem raised when it differs
    digest.add(file, name, tensor)                    # each source tensor once read (any order)
    digest.check()                                    # the rest of the folder; BuilderError if it differs

The digest is the same tree_digest(file_entries(folder)) the spec pins (builder.canonical): sha256 of
each file in file order. Bytes that the build does not read (headers, tensors it drops) or reads out
of order are read here, once, when the hash of their file reaches them.
"""

import hashlib
import threading
from pathlib import Path

from builder.canonical import CHUNK, file_entries, tree_digest
from builder.errors import BuilderError
from builder.tensorfile import header_and_start


class FilePrefix:
    """sha256 of one file's first `done` bytes, extended by pieces at any offset: a piece that starts
    beyond the prefix makes it read the bytes in between from the file; one behind it is skipped."""

    def __init__(self, path: Path):
        self.path, self.hash, self.done, self.handle, self.places = path, hashlib.sha256(), 0, None, None

    def place(self, name: str) -> int:
        """Byte offset in the file where tensor name's data begins (from its header, read once)."""
        if self.places is None:
            header, start = header_and_start(self.path)
            self.places = {key: start + info["data_offsets"][0] for key, info in header.items()}
        return self.places[name]

    def add(self, offset: int, data: memoryview) -> None:
        """Extend the hash with data found at offset (its part beyond the prefix, if any)."""
        end = offset + len(data)
        if end <= self.done:
            return
        if offset > self.done:
            self.read_through(offset)
        self.hash.update(data[self.done - offset:])
        self.done = end

    def read_through(self, stop: int | None) -> None:
        """Hash the file's bytes from the prefix up to stop (None: to its end) with plain reads."""
        if self.handle is None:
            self.handle = open(self.path, "rb", buffering=0)
        self.handle.seek(self.done)
        buffer = memoryview(bytearray(CHUNK))
        while stop is None or self.done < stop:
            size = self.handle.readinto(buffer if stop is None else buffer[: min(CHUNK, stop - self.done)])
            if not size:
                break
            self.hash.update(buffer[:size])
            self.done += size

    def entry(self, relative: str) -> dict:
        """{path, sha256, size} of the whole file, as canonical.file_entry gives it."""
        self.read_through(None)
        self.close()
        return {"path": relative, "sha256": "sha256:" + self.hash.hexdigest(), "size": self.done}

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class StreamedDigest:
    """The tree digest of folder, from what a build reads of it (add) and the rest (check)."""

    def __init__(self, folder: Path, pinned: str, refusal):
        self.folder, self.pinned, self.refusal = folder, pinned, refusal
        self.files, self.lock, self.verdict = {}, threading.Lock(), None

    def add(self, file: Path, name: str, tensor) -> None:
        """Hash tensor name of file, just read by the build (a CPU tensor holding the file's bytes)."""
        import torch

        with self.lock:
            prefix = self.files.setdefault(file, FilePrefix(file))
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            prefix.add(prefix.place(name), data)

    def reader(self, tensors: dict):
        """add() for tensors named in a tensor index (name -> tensorfile.StoredTensor): seen(name, tensor)."""
        return lambda name, tensor: self.add(tensors[name].file, name, tensor)

    def check(self) -> None:
        """Hash what the build did not read and compare with the pinned digest, once: raises
        BuilderError (the refusal, naming the actual digest) when they differ."""
        with self.lock:
            if self.verdict is None:
                self.verdict = tree_digest(self.entries())
        if self.verdict != self.pinned:
            raise BuilderError(self.refusal(self.verdict))

    def entries(self) -> list:
        """file_entries(folder), streamed files completed from where the build's reads left them."""
        streamed = {path.relative_to(self.folder).as_posix(): prefix for path, prefix in self.files.items()}
        try:
            return file_entries(self.folder, known={relative: prefix.entry(relative)
                                                    for relative, prefix in streamed.items()})
        finally:
            for prefix in self.files.values():
                prefix.close()

    def refuse_if_differs(self, error: BaseException) -> None:
        """After error: raise the refusal instead when the source is not the pinned one (a tampered
        source fails as such, whatever it broke first); otherwise return (the caller re-raises)."""
        try:
            self.check()
        except BuilderError as refused:
            raise refused from error
        except (OSError, ValueError):  # unreadable, or changed while read: the first error says more
            return
