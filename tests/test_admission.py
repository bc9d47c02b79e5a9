"""The admission line on its own: arrival order, its two bounds, and leaving it.

The server's use of it (a stream waiting for a session slot, then its exact tokens) is in
test_batching.py; here a counter of free room stands in for the slots and the KV budget.
"""
import asyncio
import threading

from edge_server.admission import AdmissionLine


class Room:
    def __init__(self, free: int = 0):
        self.free, self.admitted = free, []

    def admit(self, name):
        def attempt():
            if self.free <= 0:
                return "no room"
            self.free -= 1
            self.admitted.append(name)
            return None
        return attempt


async def _enter_in_order(line: AdmissionLine, room: Room, names, places: dict | None = None) -> list[asyncio.Task]:
    """Names starting with "r" are resumptions; `places` gets what each hears of its place in line."""
    tasks = []
    for name in names:
        moved = None if places is None else places.setdefault(name, []).append
        tasks.append(asyncio.create_task(line.enter(room.admit(name), resumed=name.startswith("r"), moved=moved)))
        await asyncio.sleep(0.01)  # each is in line before the next arrives
    return tasks


async def _settle():
    await asyncio.sleep(0.05)


def test_streams_are_admitted_in_arrival_order_even_when_a_later_one_would_fit():
    async def scenario():
        line, room = AdmissionLine(max_waiting=8, wait_s=10), Room(0)
        tasks = await _enter_in_order(line, room, ["a", "b"])
        assert len(line) == 2 and room.admitted == []
        room.free = 1  # room for one, but "a" and "b" are waiting: "c" queues behind them
        tasks += await _enter_in_order(line, room, ["c"])
        assert len(line) == 3 and room.admitted == []
        line.room_freed()
        await _settle()
        assert room.admitted == ["a"] and len(line) == 2
        room.free = 2
        line.room_freed()
        await _settle()
        assert room.admitted == ["a", "b", "c"] and len(line) == 0
        assert await asyncio.gather(*tasks) == [None, None, None]
    asyncio.run(scenario())


def test_a_stream_that_fits_with_no_one_waiting_is_admitted_at_once():
    async def scenario():
        line, room = AdmissionLine(max_waiting=0, wait_s=0), Room(1)
        assert await line.enter(room.admit("a")) is None
        assert await line.enter(room.admit("b")) == "no room"  # no line: refused at once
    asyncio.run(scenario())


def test_a_full_line_refuses_at_once_and_a_long_wait_ends_in_a_refusal():
    async def scenario():
        line, room = AdmissionLine(max_waiting=1, wait_s=0.3), Room(0)
        first = (await _enter_in_order(line, room, ["a"]))[0]
        assert "1 streams are waiting for room ahead" in await line.enter(room.admit("b"))
        assert await first == "no room; waited 0.3 s in line"
        assert len(line) == 0 and room.admitted == []
    asyncio.run(scenario())


def test_a_stream_that_goes_away_leaves_the_line_and_the_next_moves_up():
    async def scenario():
        line, room = AdmissionLine(max_waiting=8, wait_s=10), Room(0)
        a, b = await _enter_in_order(line, room, ["a", "b"])
        a.cancel()  # the device closed its stream while waiting
        await _settle()
        assert len(line) == 1
        room.free = 1
        threading.Timer(0.05, line.room_freed_threadsafe).start()  # KV freed on the model thread
        assert await asyncio.wait_for(b, 5) is None
        assert room.admitted == ["b"] and len(line) == 0
    asyncio.run(scenario())


def test_resumptions_go_ahead_of_new_streams_in_their_own_arrival_order():
    async def scenario():
        line, room = AdmissionLine(max_waiting=8, wait_s=10), Room(0)
        tasks = await _enter_in_order(line, room, ["a", "r1", "b", "r2"])
        room.free = 4
        line.room_freed()
        await _settle()
        assert room.admitted == ["r1", "r2", "a", "b"]
        assert await asyncio.gather(*tasks) == [None] * 4
    asyncio.run(scenario())


def test_a_resumption_is_admitted_at_once_when_only_new_streams_wait():
    async def scenario():
        line, room = AdmissionLine(max_waiting=8, wait_s=10), Room(0)
        tasks = await _enter_in_order(line, room, ["a"])
        room.free = 1  # room for one: the resumption takes it, "a" waits on
        assert await line.enter(room.admit("r"), resumed=True) is None
        assert room.admitted == ["r"] and len(line) == 1
        tasks[0].cancel()
    asyncio.run(scenario())


def test_each_waiting_stream_hears_how_many_are_ahead_of_it_whenever_that_changes():
    async def scenario():
        line, room, places = AdmissionLine(max_waiting=8, wait_s=10), Room(0), {}
        tasks = await _enter_in_order(line, room, ["a", "b", "r"], places)
        assert places == {"a": [0, 1], "b": [1, 2], "r": [0]}  # the resumption went ahead of both
        room.free = 1
        line.room_freed()
        await _settle()
        assert room.admitted == ["r"] and places == {"a": [0, 1, 0], "b": [1, 2, 1], "r": [0]}
        tasks[0].cancel()  # "a" leaves: "b" is next
        await _settle()
        assert places["b"] == [1, 2, 1, 0]
        tasks[1].cancel()
    asyncio.run(scenario())
