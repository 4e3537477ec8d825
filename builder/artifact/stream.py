"""Weights as a stream of overlapping stages: read each source tensor once, quantize it once, write
each output at its planned offset, hash each file once as it fills.

    reader thread   reads sources in name order, hands each to the quantizers   (bounded by bytes)
    digest thread   when asked (seen): each source's bytes hashed as read, before it is quantized
    quantizers      the format's compute, as many threads as the build's torch threads (each torch op
                    on one thread: many small ops on two threads stall on a loaded machine)
    caller          takes results in source order, writes them (os.pwrite)
    hasher thread   sha256 of each file in file order, then fsync

Results are taken in source order, so the first bad tensor (NaN, unreadable) is the one reported
whatever the threads' timing, and the bytes never depend on it: every output has its place.
"""

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from builder import failpoints, overlap, tensorfile
from builder.canonical import FileHash
from builder.console import progress
from builder.tensorfile import nbytes

# Source and output bytes read but not yet written and hashed: what bounds memory beyond the tensors
# being quantized (a tensor larger than this goes through alone).
IN_FLIGHT_BYTES = 512 << 20
AHEAD_PER_WORKER = 2  # tensors handed to each quantizer before the oldest result is taken
SPARE_BYTES = 256 << 20  # memory kept for the next source tensors of the same size (see Spares)


def write_shards(out: Path, sources: list, groups: list, assigned: list, names: list, read, compute,
                 known, seen=None) -> list:
    """Write the shards; returns their entries {path, sha256, size}, in shard order.

    sources: (name, bytes) of each source tensor, in name order; groups: the planned outputs of each
    (same order); assigned, names: each shard's outputs and file name (shards.assign keeps a source's
    outputs in one shard); read(name) -> tensor; compute(name, tensor) and known(name) ->
    {output name: tensor}: the outputs that need the source's values, and those that do not.
    seen(name, tensor): called with each source as read, in order, on a thread of its own, before the
    source is quantized (the source digest, builder.source.digest: the one read of the source serves both).
    """
    import torch

    shard_of = {o.name: index for index, outputs in enumerate(assigned) for o in outputs}
    work = [(name, shard_of[group[0].name], size + sum(nbytes(o.dtype, o.shape) for o in group), size)
            for (name, size), group in zip(sources, groups)]  # (source, shard, bytes in flight, its bytes)
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    files, entries = {}, []
    pool = ThreadPoolExecutor(workers, thread_name_prefix="quantize")
    try:
        with overlap.Crew() as crew:
            budget = crew.budget(IN_FLIGHT_BYTES)
            results, written = crew.channel(workers * AHEAD_PER_WORKER), crew.channel(workers * AHEAD_PER_WORKER)
            spares = Spares(SPARE_BYTES)
            quantize = lambda item: hand_over(item, compute, pool, results)  # noqa: E731
            if seen is None:
                crew.start(read_all, work, read, quantize, budget, spares)
            else:  # one more stage between reading and quantizing
                fresh = crew.channel(workers * AHEAD_PER_WORKER)
                crew.start(read_all, work, read, lambda item: fresh.close() if item is None else fresh.put(item),
                           budget, spares)
                crew.start(digest_all, fresh, seen, quantize)
            crew.start(hash_all, written, budget, spares, entries)
            write_all(out, work, assigned, names, known, results, written, files)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(workers)
        for planned in files.values():
            planned.close(sync=False)  # still open only after a failure
    return entries


def read_all(work: list, read, forward, budget, spares) -> None:
    """Reader thread: each source read once, in order, and forwarded as (source, tensor or the
    error of its read, shard, cost, memory); a failed read is the last, raised by the caller in order."""
    for source, shard, cost, size in work:
        budget.take(cost)
        memory = spares.take(size)
        try:
            tensor = read(source, into=memory)
        except Exception as error:  # noqa: BLE001 - raised by the caller, in source order
            forward((source, error, shard, cost, None))
            break
        forward((source, tensor, shard, cost, memory))
        del tensor, memory  # the next stage holds it now: not kept while waiting for budget
    forward(None)


def digest_all(fresh, seen, forward) -> None:
    """Digest thread: each source read seen (hashed) once, in order, then forwarded to a quantizer."""
    for item in fresh:
        if not isinstance(item[1], Exception):
            seen(item[0], item[1])
        forward(item)
        del item
    forward(None)


def hand_over(item, compute, pool, results) -> None:
    """A source read (or its error) to a quantizer, its future to the caller's results; None: the end."""
    if item is None:
        results.close()
        return
    source, tensor, shard, cost, memory = item
    if isinstance(tensor, Exception):
        failed = Future()
        failed.set_exception(tensor)
        results.put((failed, shard, cost, None))
    else:
        results.put((pool.submit(compute, source, tensor), shard, cost, memory))


class Spares:
    """Memory of source tensors that have been written and hashed, kept (up to limit bytes) for the
    next tensors of the same size: layers repeat their shapes, and fresh memory costs a page fault
    and the zeroing of every page, a third of a build's kernel time before."""

    def __init__(self, limit: int):
        self.limit, self.kept, self.lock = limit, {}, threading.Lock()

    def take(self, size: int):
        """A uint8 tensor of size bytes: a spare one, or fresh."""
        import torch

        with self.lock:
            if self.kept.get(size):
                return self.kept[size].pop()
        return torch.empty(size, dtype=torch.uint8)

    def give(self, memory) -> None:
        """Keep memory for later if there is room (nothing else may use it any more)."""
        with self.lock:
            if memory.numel() + sum(m.numel() for kept in self.kept.values() for m in kept) <= self.limit:
                self.kept.setdefault(memory.numel(), []).append(memory)


def write_all(out: Path, work: list, assigned: list, names: list, known, results, written, files: dict) -> None:
    """The caller's stage: a shard's header and known outputs when it opens, then results in source
    order, each output written at its offset, what was written handed to the hasher (with whether it
    completes its file)."""
    total, done = sum(len(outputs) for outputs in assigned), [0]

    def put(planned, outputs: dict) -> list:
        pieces = []
        for name in sorted(outputs):
            pieces.append(planned.put(name, outputs[name]))
            done[0] += 1
            if done[0] == total // 2:
                failpoints.reached("quantize")
        bar.update(len(outputs))
        return pieces

    with progress(total=total, desc="quantize", unit="tensor") as bar:
        for future, shard, cost, memory in results:
            outputs = future.result()  # the quantizer's (or the reader's) error is raised here, in order
            if shard not in files:
                planned = files[shard] = tensorfile.PlannedFile(out / names[shard], assigned[shard])
                ahead = {name: value for source, at, _, _ in work if at == shard for name, value in known(source).items()}
                written.put((planned, [planned.header, *put(planned, ahead)], 0, None, planned.remaining == 0))
            planned = files[shard]
            item = (planned, put(planned, outputs), cost, memory, planned.remaining == 0)
            del outputs, future, memory  # all of it goes (or is kept spare) once the hasher is done
            written.put(item)
            del item
    written.close()


def hash_all(written, budget, spares, entries: list) -> None:
    """Hasher thread: each file hashed once, in file order, as it fills; then flushed and closed."""
    hashes = {}
    for planned, pieces, cost, memory, complete in written:
        file_hash = hashes.setdefault(planned.path, FileHash(planned.fd))
        for offset, data in pieces:
            file_hash.add(offset, data)
        pieces = data = None  # the outputs' memory is not held while waiting for the next
        if memory is not None:
            spares.give(memory)
        memory = None
        budget.give(cost)
        if complete:
            entries.append({"path": planned.path.name, "sha256": file_hash.digest(planned.size), "size": planned.size})
            planned.close()
            failpoints.reached("shard")
