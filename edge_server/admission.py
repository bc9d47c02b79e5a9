"""Admission: a bounded line of streams waiting for a session slot and KV room.

Refusing a stream that does not fit and letting the device ask again is not first come, first
served: a device whose answer had just ended asked again at once and took the room that devices
sleeping on their retry hints had waited for, and a slot stayed empty from a session's end to
the next retry. So a stream that does not fit waits here, in arrival order (resumptions of
broken-off answers first), and is admitted as soon as the room it needs comes free. The line
is bounded twice, so it cannot grow without limit: at most `max_waiting` streams, each for at
most `wait_s`; past either the device gets RESOURCE_EXHAUSTED with a retry hint, as before
(edge_server.service).

Everything runs on the event loop except `room_freed_threadsafe`, which the model thread calls
once it has freed KV.
"""
from __future__ import annotations

import asyncio
from typing import Callable


class _Waiting:
    """One stream in line (compared by identity)."""

    def __init__(self, resumed: bool, moved: Callable[[int], None] | None):
        self.resumed, self.moved = resumed, moved
        self.told: int | None = None  # the place in line `moved` last heard


class AdmissionLine:
    def __init__(self, max_waiting: int, wait_s: float):
        self.max_waiting, self.wait_s = max_waiting, wait_s
        self._line: list[_Waiting] = []  # resumptions first, each kind in arrival order
        self._changed = asyncio.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._line)

    @property
    def _resumptions(self) -> int:
        return sum(w.resumed for w in self._line)

    async def enter(self, admit: Callable[[], str | None], resumed: bool = False,
                    moved: Callable[[int], None] | None = None) -> str | None:
        """Calls `admit` (None once it admitted the stream, else why it could not) now if no one
        waits, and then whenever room may have come free while this stream is first in line.
        Returns None once admitted, else why not when the line is full or the wait ran out.
        While the stream waits, `moved` hears how many wait ahead of it whenever that changes.

        A resumption (a device whose answer broke off mid-way) goes ahead of the new streams,
        behind the other resumptions: its user is watching a stalled answer, and the prompt
        cache entry that makes it cheap may be dropped to make room for others while it waits."""
        self._loop = asyncio.get_running_loop()
        ahead = self._resumptions if resumed else len(self._line)
        why = admit() if not ahead else f"{ahead} streams are waiting for room ahead of this one"
        if why is None or len(self._line) >= self.max_waiting or self.wait_s <= 0:
            return why
        me, last = _Waiting(resumed, moved), [why]
        self._line.insert(ahead, me)
        self._tell_places()

        def admitted() -> bool:
            if self._line[0] is not me:
                return False
            last[0] = admit()
            return last[0] is None

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(admitted), self.wait_s)
            return None
        except TimeoutError:
            return f"{last[0]}; waited {self.wait_s:g} s in line"
        finally:  # admitted, out of time, or the device went away
            self._line.remove(me)
            self._tell_places()
            self.room_freed()  # whoever is first in line now may fit

    def _tell_places(self) -> None:
        for ahead, waiting in enumerate(self._line):
            if waiting.moved is not None and waiting.told != ahead:
                waiting.told = ahead
                waiting.moved(ahead)

    def room_freed(self) -> None:
        """A session ended or KV came free: the first in line tries again."""
        if self._line:
            asyncio.ensure_future(self._wake())

    def room_freed_threadsafe(self) -> None:
        if self._loop is not None and self._line:
            self._loop.call_soon_threadsafe(self.room_freed)

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()
