"""Threads that overlap the stages of a stream (read, compute, write, hash), joined by bounded queues.

    with Crew() as crew:
        items = crew.channel(2)
        crew.start(produce, items)   # a worker thread: items.put(...), then items.close()
        for item in items:           # the caller consumes
            ...

The first error of any worker stops them all (every wait wakes up) and is raised, unchanged, in the
caller when the `with` block ends or the caller next waits; an error in the caller stops the
workers too. `with` returns only after every worker has ended, so nothing is left running or
writing once it is over (a failed build deletes its staging folder right after).
"""

import threading
from collections import deque


class Cancelled(Exception):
    """Raised in a thread that waits after its crew stopped (another thread failed)."""


class Crew:
    """Worker threads for one stream, one lock and condition for all their queues and budgets."""

    def __init__(self):
        self.condition = threading.Condition()
        self.threads, self.error, self.stopped = [], None, False

    def start(self, function, *args) -> None:
        """Run function(*args) in a new thread; an exception in it stops the crew."""
        def run():
            try:
                function(*args)
            except Cancelled:
                pass
            except BaseException as error:  # noqa: B036 - handed to the caller, who raises it
                self.stop(error)

        thread = threading.Thread(target=run, name=getattr(function, "__name__", "worker"), daemon=True)
        self.threads.append(thread)
        thread.start()

    def stop(self, error: BaseException | None = None) -> None:
        """Stop every wait; remember the first error."""
        with self.condition:
            if error is not None and self.error is None:
                self.error = error
            self.stopped = True
            self.condition.notify_all()

    def wait_for(self, ready) -> None:
        """Wait (holding the condition) until ready() is true; raise Cancelled once the crew stops."""
        while not ready():
            if self.stopped:
                raise Cancelled()
            self.condition.wait()
        if self.stopped:
            raise Cancelled()

    def channel(self, size: int) -> "Channel":
        return Channel(self, size)

    def budget(self, limit: int) -> "Budget":
        return Budget(self, limit)

    def __enter__(self) -> "Crew":
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if value is not None and not isinstance(value, Cancelled):
            self.stop(value)
        for thread in self.threads:
            thread.join()
        if self.error is not None and (value is None or isinstance(value, Cancelled)):
            raise self.error
        return False


class Channel:
    """A first-in first-out queue of at most size items; close() ends iteration once it is drained."""

    def __init__(self, crew: Crew, size: int):
        self.crew, self.size, self.items, self.closed = crew, size, deque(), False

    def put(self, item) -> None:
        with self.crew.condition:
            self.crew.wait_for(lambda: len(self.items) < self.size)
            self.items.append(item)
            self.crew.condition.notify_all()

    def close(self) -> None:
        with self.crew.condition:
            self.closed = True
            self.crew.condition.notify_all()

    def __iter__(self):
        while True:
            with self.crew.condition:
                self.crew.wait_for(lambda: self.items or self.closed)
                if not self.items:
                    return
                item = self.items.popleft()
                self.crew.condition.notify_all()
            yield item


class Budget:
    """Bytes in flight between stages: take(n) waits while others hold more than limit together with
    n; an item alone may exceed the limit (it then goes through by itself)."""

    def __init__(self, crew: Crew, limit: int):
        self.crew, self.limit, self.held = crew, limit, 0

    def take(self, count: int) -> None:
        with self.crew.condition:
            self.crew.wait_for(lambda: self.held == 0 or self.held + count <= self.limit)
            self.held += count

    def give(self, count: int) -> None:
        with self.crew.condition:
            self.held -= count
            self.crew.condition.notify_all()
