"""The cycle collector pause of the stages that stream many objects (certsync.heap)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from certsync.heap import cycle_collection_paused


@pytest.fixture(autouse=True)
def _collector_on() -> None:
    gc.enable()
    gc.unfreeze()  # nothing frozen, as in a process not forked from a frozen heap


def test_the_collector_is_off_inside_and_on_after_even_on_error() -> None:
    with cycle_collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), cycle_collection_paused():
        raise KeyError("a stage failed")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with cycle_collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def _side_by_side(first_to_end: str) -> None:
    """Stage a enters its block first, then b; they leave in the order given."""
    inside = {"a": threading.Event(), "b": threading.Event()}
    leave = {"a": threading.Event(), "b": threading.Event()}

    def stage(name: str) -> None:
        with cycle_collection_paused():
            inside[name].set()
            leave[name].wait()

    threads = {n: threading.Thread(target=stage, args=(n,)) for n in inside}
    for name in ("a", "b"):
        threads[name].start()
        inside[name].wait()
    for name in sorted(leave, key=lambda n: n != first_to_end):
        leave[name].set()
        threads[name].join()


@pytest.mark.parametrize("first_to_end", ["a", "b"])
def test_stages_side_by_side_leave_it_on_whichever_ends_first(first_to_end: str) -> None:
    """Two stages at once on threads of one process (as the benchmark ran extract and
    read_recipients before it forked each): b finds the collector off when it enters, and must not
    turn it off again when a has ended."""
    _side_by_side(first_to_end)
    assert gc.isenabled()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_what_the_block_made_is_left_to_full_collections_and_its_cycles_are_collected() -> None:
    """The objects a block made go to the oldest generation: the young collection due as soon as
    the block ends does not scan them (else it would move them only to the middle one). A cycle the
    block dropped is still collected by the next full collection."""
    with cycle_collection_paused():
        kept = [[n] for n in range(1000)]
        dropped = _Cycle()
    middle = gc.get_objects(generation=1)  # allocates: the due young collection runs first
    assert not any(o is kept or o is kept[0] for o in middle)
    cycle = weakref.ref(dropped)
    del middle, dropped
    # Identity only: isinstance on every object would ask lazy proxies other tests left for their class.
    assert any(o is kept for o in gc.get_objects(generation=2))
    gc.collect(1)  # young collections do not reach the dropped cycle
    assert any(o is cycle() for o in gc.get_objects(generation=2))
    gc.collect()
    assert cycle() is None


def test_a_heap_frozen_before_a_fork_stays_frozen_and_the_block_joins_it() -> None:
    """A process whose parent froze its heap before forking it (as Airflow's executors do): the
    block does not thaw what was frozen, and what it made leaves the young generations too."""
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with cycle_collection_paused():
            kept = [[n] for n in range(1000)]
        assert gc.get_freeze_count() >= frozen + len(kept)
        assert not any(o is kept for g in range(3) for o in gc.get_objects(generation=g))
    finally:
        gc.unfreeze()
