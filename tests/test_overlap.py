"""Threads joined by bounded queues (builder/overlap.py): errors surface in the caller unchanged,
nothing hangs, nothing is left running."""

import threading
import time

import pytest

from builder.overlap import Cancelled, Crew


def test_items_pass_in_order_through_a_bounded_channel():
    with Crew() as crew:
        numbers = crew.channel(2)

        def produce():
            for number in range(50):
                numbers.put(number)
            numbers.close()

        crew.start(produce)
        assert list(numbers) == list(range(50))


def test_a_worker_error_is_raised_unchanged_in_the_caller_and_wakes_every_waiter():
    error = OSError(27, "File too large")
    blocked = threading.Event()
    with pytest.raises(OSError) as raised:
        with Crew() as crew:
            never = crew.channel(1)

            def wait_forever():
                blocked.set()
                list(never)  # nothing is ever put: only the crew's stop can end this

            def fail():
                blocked.wait()
                raise error

            crew.start(wait_forever)
            crew.start(fail)
            for _ in never:  # the caller waits too
                pass
    assert raised.value is error
    assert all(not thread.is_alive() for thread in crew.threads)


def test_an_error_in_the_caller_stops_the_workers_and_is_the_one_raised():
    with pytest.raises(ValueError, match="caller"):
        with Crew() as crew:
            full = crew.channel(1)

            def produce():
                while True:
                    full.put(1)  # blocks once the channel is full, until the crew stops

            crew.start(produce)
            time.sleep(0.05)
            raise ValueError("caller")
    assert all(not thread.is_alive() for thread in crew.threads)


def test_a_budget_lets_one_oversized_item_through_alone_and_waits_otherwise():
    with Crew() as crew:
        budget = crew.budget(10)
        budget.take(25)  # alone: more than the limit, still allowed
        taken = threading.Event()

        def take_more():
            budget.take(1)
            taken.set()

        crew.start(take_more)
        assert not taken.wait(0.1)
        budget.give(25)
        assert taken.wait(5)


def test_a_wait_after_the_crew_stopped_raises_cancelled():
    crew = Crew()
    crew.stop()
    with pytest.raises(Cancelled):
        crew.channel(1).put(1)
