#!/usr/bin/env python3
"""Userspace link emulator: a loopback-only asyncio TCP proxy that shapes each direction.

Why a userspace proxy: the kernel on the benchmark machines may lack ``sch_netem`` (it has
``tbf``/``htb`` only), and a proxy needs no root. ``scripts/netem_ns.sh`` is the kernel
alternative where netem exists. Every result produced through this proxy is labelled
``emulator: "userspace-proxy"`` (see :data:`EMULATOR`) so benchmarks can record which
emulator made it.

Per direction (``up`` = device/client -> edge/upstream, ``down`` = upstream -> client), each
chunk of bytes read from one socket goes through a model of a link before it is written to
the other socket:

1. *Stalls*: every ``stall_every_s`` seconds (first one ``stall_every_s`` after the proxy
   starts) the link is down for ``stall_ms``: nothing starts transmission and nothing is
   delivered in that window (a handover / satellite reconfiguration).
2. *Rate*: a token bucket (``rate`` bytes/s, ``burst`` bytes) gives the time the chunk has
   been serialised onto the link. Chunks are cut into small quanta so pacing is smooth.
3. *Delay and jitter*: the chunk is delivered at
   ``release = max(previous release, tx_done + delay + U(-jitter, +jitter))``. The ``max``
   keeps byte order (TCP never reorders a stream), unlike packet-level netem reordering.

*Drops* (off in every profile; ``--drop-every-s``): every ``drop_every_s`` seconds every open
connection is reset both ways, as when a device's network changes under it (Wi-Fi to cellular, a
new address); new connections go through at once. With ``drop_silently`` (``--drop-silently``)
they are not reset but go quiet for good: nothing more is delivered either way and nothing is
closed, as when the device's old address simply stops answering; only keepalives notice, and
a side that gives such a connection up (closes or resets it) goes unheard by the other.

Timing: release times are waited for with a helper-thread timer (~0.1 ms precision, see
:class:`_PreciseTimer`) because asyncio's own timers run 0.1-2 ms late on epoll. Rates
count TCP payload bytes (kernel shapers count headers too, ~4 % more).

A bounded per-direction queue gives TCP back-pressure (a full link stops the sender) instead
of buffering a whole transfer in the proxy. EOF (FIN) is forwarded after the data before it,
and a half-closed connection keeps working in the other direction (gRPC/HTTP/2 needs that);
when both directions are finished, or either side errors, both sockets are closed.

Packet loss is not emulated: below TCP it only shows as retransmission delay; use
``netem_ns.sh --loss-pct`` with kernel netem for that.

Profiles (one-way delay = RTT/2 in each direction; rates in Mbit/s, 1 Mbit = 10^6 bit).
All figures are *typical* published values, not exact citations:

=================  =====  ======  =====  =====  ============  ===========================
name               RTT    jitter  down   up     stalls        typical source
=================  =====  ======  =====  =====  ============  ===========================
lan                0.5    0       1000   1000   -             Gigabit Ethernet (IEEE
                                                              802.3ab 1000BASE-T); switched
                                                              LAN RTT typically < 1 ms
wifi               6      2       200    100    -             typical home Wi-Fi 5/6
                                                              (802.11ac/ax) speed-test
                                                              results; contention jitter
5g                 20     3       150    30     -             typical 5G NR sub-6 GHz
                                                              medians in Ookla/OpenSignal
                                                              style reports; 3GPP TR 38.913
                                                              targets 4 ms one-way radio
                                                              user-plane latency (eMBB)
4g                 50     5       30     10     50 ms / 20 s  typical LTE medians in
                                                              Ookla/OpenSignal style
                                                              reports; LTE handover
                                                              interruption typically tens
                                                              of ms
3g                 120    15      3      1      -             typical HSPA/HSPA+ figures
                                                              (a few Mbit/s, ~100-150 ms)
satellite          600    10      25     3      -             GEO (35,786 km): ~480 ms of
                                                              propagation alone; consumer
                                                              GEO plans typically 25/3
satellite-leo      45     8       100    12     100 ms / 15 s typical Starlink medians in
                                                              Ookla style reports; the
                                                              widely reported 15 s satellite
                                                              reassignment interval
rttR-Nmbit         20|50  0       10|50  same   -             DSSD evaluation grid (RTT 20
                                  |100                        and 50 ms x 10/50/100 Mbit/s)
=================  =====  ======  =====  =====  ============  ===========================

Usage::

    netem.py --list-profiles [--json]
    netem.py --profile 4g --listen 127.0.0.1:50052 --upstream 127.0.0.1:50051
    netem.py --profile 4g --self-test
    netem.py --profile wifi --drop-every-s 5 --listen 127.0.0.1:50052 --upstream 127.0.0.1:50051

Importable (scripts/ is not a package; load by file path)::

    with run_proxy_in_thread("4g", upstream=("127.0.0.1", port)) as (host, port): ...
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import ipaddress
import itertools
import json
import random
import re
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

EMULATOR = "userspace-proxy"
"""Label recorded with every result produced through this proxy."""

READ_SIZE = 64 * 1024
MIN_BURST = 16 * 1024
MAX_QUANTUM = 64 * 1024
MIN_QUANTUM = 1448  # one Ethernet-MSS worth: pacing finer than a packet is pointless
UNLIMITED_QUEUE = 8 * 1024 * 1024
MAX_LATENESS = 0.0005  # cap of the learned timer hand-off latency (s); see _PreciseTimer
Address = tuple[str, int]


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """Parameters of an emulated link; validated on construction so a bad one fails early."""

    name: str
    delay_ms: float  # one-way propagation delay, applied in each direction
    down_mbit: float | None  # upstream -> client rate; None = unlimited
    up_mbit: float | None  # client -> upstream rate; None = unlimited
    jitter_ms: float = 0.0  # uniform +-jitter on each chunk's delay (order is kept)
    burst_bytes: int | None = None  # token-bucket depth; None = max(16 KiB, 10 ms of rate)
    stall_every_s: float = 0.0  # 0 = no scheduled stalls
    stall_ms: float = 0.0
    drop_every_s: float = 0.0  # 0 = never; else every open connection is reset this often
    drop_silently: bool = False  # drops leave connections open and silent instead of resetting them
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        errors = []
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            errors.append("name must be lowercase [a-z0-9._-]")
        if not self.delay_ms >= 0:
            errors.append("delay_ms must be >= 0")
        if not self.jitter_ms >= 0:
            errors.append("jitter_ms must be >= 0")
        for field in ("down_mbit", "up_mbit"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                errors.append(f"{field} must be > 0 or None (unlimited)")
        if self.burst_bytes is not None and not self.burst_bytes >= MIN_QUANTUM:
            errors.append(f"burst_bytes must be >= {MIN_QUANTUM}")
        if self.stall_every_s or self.stall_ms:
            if not (self.stall_every_s > 0 and 0 < self.stall_ms < self.stall_every_s * 1000):
                errors.append("stalls need stall_every_s > 0 and 0 < stall_ms < stall period")
        if not self.drop_every_s >= 0:
            errors.append("drop_every_s must be >= 0 (0 = no drops)")
        if errors:
            raise ValueError(f"invalid profile {self.name!r}: " + "; ".join(errors))

    @property
    def rtt_ms(self) -> float:
        """Round trip of an idle link: the one-way delay in each direction."""
        return 2 * self.delay_ms

    def rate_bps(self, direction: str) -> float | None:
        """Rate of ``direction`` ('up' or 'down') in bytes/s, None if unlimited."""
        mbit = self.up_mbit if direction == "up" else self.down_mbit
        return None if mbit is None else mbit * 1e6 / 8

    def burst(self, direction: str) -> int:
        """Token-bucket depth in bytes; the default is at least 10 ms of line rate."""
        if self.burst_bytes is not None:
            return self.burst_bytes
        rate = self.rate_bps(direction)
        return MIN_BURST if rate is None else max(MIN_BURST, int(rate * 0.010))

    def to_dict(self) -> dict[str, object]:
        """Parameters plus derived values, as printed by ``--list-profiles --json``."""
        d: dict[str, object] = dataclasses.asdict(self)
        d["rtt_ms"] = self.rtt_ms
        d["burst_up_bytes"] = self.burst("up")
        d["burst_down_bytes"] = self.burst("down")
        return d


def _grid() -> list[Profile]:
    out = []
    for rtt in (20, 50):
        for mbit in (10, 50, 100):
            out.append(Profile(
                f"rtt{rtt}-{mbit}mbit", rtt / 2, mbit, mbit,
                description=f"DSSD grid: RTT {rtt} ms, {mbit} Mbit/s symmetric, no jitter",
                source="DSSD evaluation grid (RTT 20/50 ms x 10/50/100 Mbit/s)"))
    return out


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("lan", 0.25, 1000, 1000,
            description="wired gigabit LAN to an on-premises edge server",
            source="Gigabit Ethernet (IEEE 802.3ab); switched-LAN RTT typically < 1 ms"),
    Profile("wifi", 3, 200, 100, jitter_ms=2,
            description="home/office Wi-Fi 5/6 to an edge box on the same LAN",
            source="typical 802.11ac/ax real-world speed-test figures; contention jitter"),
    Profile("5g", 10, 150, 30, jitter_ms=3,
            description="5G NR sub-6 GHz to a nearby (MEC) edge",
            source="typical Ookla/OpenSignal-style 5G medians; 3GPP TR 38.913 eMBB target "
                   "4 ms one-way radio user-plane latency"),
    Profile("4g", 25, 30, 10, jitter_ms=5, stall_every_s=20, stall_ms=50,
            description="LTE with a handover interruption every 20 s",
            source="typical Ookla/OpenSignal-style LTE medians; LTE handover interruption "
                   "typically tens of ms"),
    Profile("3g", 60, 3, 1, jitter_ms=15,
            description="UMTS/HSPA+",
            source="typical HSPA/HSPA+ figures: a few Mbit/s down, ~100-150 ms RTT"),
    Profile("satellite", 300, 25, 3, jitter_ms=10,
            description="geostationary satellite (GEO)",
            source="GEO altitude 35,786 km gives ~480 ms RTT of propagation alone; "
                   "typical measured ~600 ms; typical consumer GEO plan 25/3 Mbit/s"),
    Profile("satellite-leo", 22.5, 100, 12, jitter_ms=8, stall_every_s=15, stall_ms=100,
            description="LEO constellation (Starlink-like) with periodic reassignment stalls",
            source="typical Ookla-style Starlink medians; widely reported 15 s "
                   "satellite reassignment interval"),
    *_grid(),
]}


def get_profile(profile: str | Profile) -> Profile:
    """Look a profile up by name (clear error listing the known ones) or pass one through."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}") from None


def with_drops(profile: str | Profile, every_s: float, silently: bool = False) -> Profile:
    """The profile, or (every_s > 0) the same link with every connection reset (or silenced)
    that often, named PROFILE-dropSs (PROFILE-silenceSs)."""
    base = get_profile(profile)
    if not every_s:
        return base
    kind = "silence" if silently else "drop"
    return dataclasses.replace(base, name=f"{base.name}-{kind}{every_s:g}s", drop_every_s=every_s,
                               drop_silently=silently)


# --------------------------------------------------------------------------- addresses


def require_loopback(host: str, what: str) -> None:
    """Refuse anything that is not loopback: the emulator must never expose or reach a LAN."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"{what} host {host!r} does not resolve: {exc}") from None
    bad = sorted({str(i[4][0]) for i in infos if not ipaddress.ip_address(i[4][0]).is_loopback})
    if bad or not infos:
        raise ValueError(f"{what} address {host!r} is not loopback ({', '.join(bad)}); "
                         "netem.py only listens on and forwards to 127.0.0.0/8 or ::1")


def parse_hostport(text: str) -> Address:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``."""
    m = re.fullmatch(r"\[(.+)\]:(\d+)|([^:]+):(\d+)", text)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    return host, int(m.group(2) or m.group(4))


# --------------------------------------------------------------------------- link model


class LinkModel:
    """Virtual-time model of one direction: maps (bytes, arrival time) to a release time.

    Pure computation (no I/O) so the delay/rate/stall/ordering rules are testable directly.
    """

    def __init__(self, profile: Profile, direction: str, epoch: float,
                 rng: random.Random) -> None:
        self.delay = profile.delay_ms / 1000
        self.jitter = profile.jitter_ms / 1000
        self.rate = profile.rate_bps(direction)
        self.burst = profile.burst(direction)
        self.stall_every = profile.stall_every_s
        self.stall = profile.stall_ms / 1000
        self.epoch = epoch
        self.rng = rng
        self._tokens = float(self.burst)
        self._t = epoch  # virtual time up to which the token bucket is accounted
        self._last_release = epoch
        if self.rate is None:
            self.quantum = READ_SIZE
            in_flight = UNLIMITED_QUEUE
        else:
            self.quantum = int(min(self.burst, MAX_QUANTUM, max(MIN_QUANTUM, self.rate * 0.002)))
            in_flight = 2 * self.rate * (self.delay + self.jitter + self.stall) + self.burst
        self.queue_limit = int(max(256 * 1024, in_flight))

    def after_stall(self, t: float) -> float:
        """``t`` if the link is up then, else the end of the stall covering ``t``."""
        if self.stall_every <= 0:
            return t
        k = int((t - self.epoch) // self.stall_every)
        start = self.epoch + k * self.stall_every
        return start + self.stall if k >= 1 and t < start + self.stall else t

    def schedule(self, nbytes: int, now: float) -> float:
        """Release time of ``nbytes`` that arrived at ``now`` (call in arrival order)."""
        t = self.after_stall(max(now, self._t) if self.rate else now)
        if self.rate:
            tokens = min(self.burst, self._tokens + (t - self._t) * self.rate) - nbytes
            if tokens < 0:  # wait for the deficit to refill: serialisation time
                t += -tokens / self.rate
                tokens = 0.0
            self._t, self._tokens = t, tokens
        sample = self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        release = self.after_stall(max(self._last_release, t + max(0.0, self.delay + sample)))
        self._last_release = release
        return release

    def schedule_eof(self, now: float) -> float:
        """FIN follows the data and the propagation delay, but costs no rate."""
        release = self.after_stall(max(self._last_release, now + self.delay))
        self._last_release = release
        return release


class _Channel:
    """Bounded FIFO of (release time, bytes | None=EOF) between a reader and a writer task.

    Bounded in bytes so a slow emulated link pushes back on the real sender (as TCP would)
    rather than the proxy swallowing a whole transfer.
    """

    def __init__(self, limit: int) -> None:
        self._items: deque[tuple[float, bytes | None]] = deque()
        self._bytes = 0
        self._limit = limit
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    async def wait_space(self, nbytes: int) -> None:
        while self._bytes and self._bytes + nbytes > self._limit:
            self._writable.clear()
            await self._writable.wait()

    def push(self, release: float, data: bytes | None) -> None:
        self._items.append((release, data))
        self._bytes += len(data) if data else 0
        self._readable.set()

    async def head(self) -> float:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        return self._items[0][0]

    def pop_ready(self, now: float) -> tuple[list[bytes], bool]:
        """Pop the head and every following item released by ``now``; True if EOF popped."""
        out: list[bytes] = []
        while self._items and (not out or self._items[0][0] <= now):
            _, data = self._items.popleft()
            if data is None:
                self._writable.set()
                return out, True
            self._bytes -= len(data)
            out.append(data)
        self._writable.set()
        return out, False


class _PreciseTimer:
    """Wakes asyncio futures at ``time.monotonic()`` deadlines from one helper thread.

    Why not ``asyncio.sleep``: the epoll selector rounds every timeout up to whole
    milliseconds (twice, through float error, so 9 ms can become 10 ms), so each hop would
    run 0.1-2 ms late and wobble by as much. A thread in a timed condition wait wakes within
    ~0.1 ms and hands the wake-up to the loop with ``call_soon_threadsafe``; nothing
    busy-waits. Shared by every proxy and event loop in the process.
    """

    def __init__(self) -> None:
        self.lateness = 0.0002  # learned mean wake-up latency (s), subtracted from deadlines
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    async def sleep_until(self, deadline: float) -> None:
        """Return at ``deadline`` (loop.time(), which is time.monotonic for asyncio loops).

        The thread-to-loop hand-off costs a steady ~0.1-0.4 ms; it is learned online (an
        integral controller on the observed lateness) and taken off future deadlines.
        """
        loop = asyncio.get_running_loop()
        await self._future_at(deadline - self.lateness, loop)
        # Clamp the step (a preempted wake-up is an outlier) and the total (lateness caused
        # by a busy loop is not hand-off cost; releasing earlier would not help it).
        err = min(0.0005, max(-0.0005, loop.time() - deadline))
        self.lateness = min(MAX_LATENESS, max(0.0, self.lateness + 0.1 * err))

    def _future_at(self, deadline: float,
                   loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="netem-timer",
                                                daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), loop, fut))
            self._cond.notify()
        return fut

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, loop, fut = heapq.heappop(self._heap)
                    with contextlib.suppress(RuntimeError):  # that loop is closed
                        loop.call_soon_threadsafe(_wake, fut)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # the sleeper may have been cancelled meanwhile
        fut.set_result(None)


_TIMER = _PreciseTimer()


# --------------------------------------------------------------------------- proxy


class LinkProxy:
    """Loopback TCP proxy applying ``profile`` to every connection from ``listen`` to ``upstream``."""

    def __init__(self, profile: str | Profile, listen: Address = ("127.0.0.1", 0),
                 upstream: Address = ("127.0.0.1", 50051), seed: int | None = None) -> None:
        self.profile = get_profile(profile)
        require_loopback(listen[0], "listen")
        require_loopback(upstream[0], "upstream")
        self.listen = listen
        self.upstream = upstream
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._epoch = 0.0
        self._dropper: asyncio.Task[None] | None = None
        self._silenced: set[asyncio.Task[None]] = set()  # connections a silent drop has cut
        self.stats = {"connections": 0, "active": 0, "bytes_up": 0, "bytes_down": 0,
                      "upstream_failures": 0, "dropped": 0}

    @property
    def address(self) -> Address:
        """The bound (host, port); useful with port 0."""
        assert self._server is not None, "start() first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def describe(self) -> dict[str, object]:
        """What produced a result: the emulator label and the profile parameters."""
        return {"emulator": EMULATOR, "profile": self.profile.to_dict()}

    async def start(self) -> None:
        self._epoch = asyncio.get_running_loop().time()
        self._server = await asyncio.start_server(
            self._on_client, self.listen[0], self.listen[1], backlog=1024, reuse_address=True)
        if self.profile.drop_every_s:
            self._dropper = asyncio.ensure_future(self._drop_periodically())

    async def _drop_periodically(self) -> None:
        """Resets every open connection each ``drop_every_s`` (see the module docstring)."""
        for k in itertools.count(1):
            await _TIMER.sleep_until(self._epoch + k * self.profile.drop_every_s)
            for task in list(self._conns):
                if self.profile.drop_silently:
                    self._silenced.add(task)  # _deliver discards from now on
                else:
                    task.cancel()  # _relay aborts both sockets: each peer sees a reset
                self.stats["dropped"] += 1

    async def close(self) -> None:
        """Stop listening and tear down every proxied connection."""
        if self._dropper is not None:
            self._dropper.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    async def _on_client(self, c_reader: asyncio.StreamReader,
                         c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.stats["connections"] += 1
        self.stats["active"] += 1
        try:
            try:
                u_reader, u_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.stats["upstream_failures"] += 1
                c_writer.transport.abort()
                return
            await self._relay(c_reader, c_writer, u_reader, u_writer)
        except asyncio.CancelledError:
            # Only close() and drops cancel us. Finish normally: on 3.11 the stream callback calls
            # task.exception() on a cancelled handler task and logs a spurious traceback.
            pass
        finally:
            self.stats["active"] -= 1
            self._conns.discard(task)
            self._silenced.discard(task)

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                     u_reader: asyncio.StreamReader, u_writer: asyncio.StreamWriter) -> None:
        """Run both directions until both have delivered EOF or anything fails, then close."""
        loop = asyncio.get_running_loop()
        up = LinkModel(self.profile, "up", self._epoch, self._rng)
        down = LinkModel(self.profile, "down", self._epoch, self._rng)
        ch_up, ch_down = _Channel(up.queue_limit), _Channel(down.queue_limit)
        ok = False
        try:
            async with asyncio.TaskGroup() as tg:
                conn = asyncio.current_task()
                tg.create_task(self._ingest(c_reader, ch_up, up, loop, conn))
                tg.create_task(self._deliver(ch_up, u_writer, loop, "bytes_up", conn))
                tg.create_task(self._ingest(u_reader, ch_down, down, loop, conn))
                tg.create_task(self._deliver(ch_down, c_writer, loop, "bytes_down", conn))
            ok = True
        except* OSError:  # reset/broken pipe on either side: drop the whole connection
            pass
        finally:
            # Clean FIN when both directions finished; RST-style abort on error/cancel so
            # the peer of a failed side learns about it immediately.
            for w in (c_writer, u_writer):
                if ok:
                    w.close()
                else:
                    w.transport.abort()
            for w in (c_writer, u_writer):
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(w.wait_closed(), 1.0)

    async def _ingest(self, reader: asyncio.StreamReader, ch: _Channel, link: LinkModel,
                      loop: asyncio.AbstractEventLoop, conn: asyncio.Task | None) -> None:
        """Read from one socket and time-stamp quanta onto the link; then EOF. Once a silent
        drop has cut `conn`, a reset from this side ends only this side: the other never hears
        of it (the connection stays open there until that side gives up too)."""
        q = link.quantum
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except OSError:
                if conn not in self._silenced:
                    raise
                data = b""
            if not data:
                ch.push(link.schedule_eof(loop.time()), None)
                return
            for i in range(0, len(data), q):
                piece = data[i:i + q]
                await ch.wait_space(len(piece))
                ch.push(link.schedule(len(piece), loop.time()), piece)

    async def _deliver(self, ch: _Channel, writer: asyncio.StreamWriter,
                       loop: asyncio.AbstractEventLoop, counter: str, conn: asyncio.Task | None) -> None:
        """Write each chunk at its release time (coalescing ready ones); forward EOF last. Once
        a silent drop has cut `conn`, nothing more goes through, EOF included."""
        while True:
            release = await ch.head()
            if release > loop.time():
                await _TIMER.sleep_until(release)
            chunks, eof = ch.pop_ready(loop.time())
            if conn in self._silenced:
                if eof:
                    return  # this side gave up; the other must find out by itself
                continue
            if chunks:
                data = b"".join(chunks)
                writer.write(data)
                self.stats[counter] += len(data)
                await writer.drain()
            if eof:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return


@contextlib.contextmanager
def run_proxy_in_thread(profile: str | Profile, upstream: Address,
                        listen: Address = ("127.0.0.1", 0),
                        seed: int | None = None) -> Iterator[Address]:
    """Run a :class:`LinkProxy` on its own event loop in a daemon thread; yield (host, port).

    For tests and benchmarks whose own code is blocking (e.g. a gRPC client).
    """
    proxy = LinkProxy(profile, listen, upstream, seed=seed)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []

    def runner() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(proxy.start())
        except BaseException as exc:  # reported to the caller's thread below
            errors.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(proxy.close())
        loop.close()

    thread = threading.Thread(target=runner, name=f"netem-{proxy.profile.name}", daemon=True)
    thread.start()
    started.wait(10)
    if errors:
        raise errors[0]
    try:
        yield proxy.address
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# --------------------------------------------------------------------------- self-test

_HDR = struct.Struct("!cQ")  # mode byte, byte count


async def _test_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       marks: dict[str, tuple[float, float, int]], skip: int) -> None:
    """Modes: E = echo, S = sink N bytes (timing marks recorded), D = source N bytes."""
    try:
        mode, n = _HDR.unpack(await reader.readexactly(_HDR.size))
        if mode == b"E":
            while data := await reader.read(READ_SIZE):
                writer.write(data)
                await writer.drain()
        elif mode == b"S":
            marks["up"] = await _receive_timed(reader, n, skip)
            writer.write(b"k")
            await writer.drain()
        elif mode == b"D":
            block = bytes(READ_SIZE)
            for i in range(0, n, READ_SIZE):
                writer.write(block[:min(READ_SIZE, n - i)])
                await writer.drain()
    except (asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


async def _receive_timed(reader: asyncio.StreamReader, n: int,
                         skip: int) -> tuple[float, float, int]:
    """Receive n bytes; return (t when > skip bytes had arrived, t end, bytes after the mark).

    Starting the clock after ``skip`` bytes leaves out the token-bucket burst and the
    propagation delay, so what is left is the steady-state line rate.
    """
    got, t0, at0 = 0, 0.0, 0
    while got < n:
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionError(f"EOF after {got}/{n} bytes")
        got += len(data)
        if not t0 and got > skip:
            t0, at0 = time.perf_counter(), got
    return t0, time.perf_counter(), n - at0


async def self_test(profile: str | Profile, seconds: float = 1.5,
                    max_bytes: int = 64 * 1024 * 1024, seed: int | None = 1) -> dict[str, object]:
    """Measure RTT and per-direction throughput through the proxy and compare to the profile.

    RTT: median of several 32-byte pings on an idle connection (robust to scheduler noise);
    pass if within max(10 %, 1 ms), the absolute floor covering loopback/event-loop overhead
    that dominates sub-ms profiles. Throughput: ``seconds`` worth of bytes per direction,
    measured after the burst; pass if within 10 % of the profile rate.
    """
    prof = get_profile(profile)
    marks: dict[str, tuple[float, float, int]] = {}
    skip = 2 * max(prof.burst("up"), prof.burst("down")) + READ_SIZE
    server = await asyncio.start_server(lambda r, w: _test_server(r, w, marks, skip),
                                        "127.0.0.1", 0)
    proxy = LinkProxy(prof, ("127.0.0.1", 0), server.sockets[0].getsockname()[:2], seed=seed)
    await proxy.start()
    result: dict[str, object] = {"emulator": EMULATOR, "profile": prof.name,
                                 "params": prof.to_dict()}
    checks: dict[str, bool] = {}
    try:
        host, port = proxy.address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(_HDR.pack(b"E", 0))
        n_pings = max(5, min(21, int(3000 / max(prof.rtt_ms, 1.0))))
        rtts = []
        for _ in range(n_pings + 1):  # the first one warms up the connection
            t = time.perf_counter()
            writer.write(b"p" * 32)
            await reader.readexactly(32)
            rtts.append((time.perf_counter() - t) * 1000)
        writer.close()
        rtt = statistics.median(rtts[1:])
        tol = max(0.10 * prof.rtt_ms, 1.0)
        result["rtt_ms"] = {"expected": prof.rtt_ms, "median": round(rtt, 3),
                            "min": round(min(rtts[1:]), 3), "max": round(max(rtts[1:]), 3),
                            "n": n_pings, "tolerance_ms": round(tol, 3)}
        checks["rtt"] = abs(rtt - prof.rtt_ms) <= tol
        for direction in ("up", "down"):
            rate = prof.rate_bps(direction)
            if rate is None:
                continue
            n = int(min(max_bytes, rate * seconds)) + skip
            reader, writer = await asyncio.open_connection(host, port)
            if direction == "up":
                writer.write(_HDR.pack(b"S", n))
                block = bytes(READ_SIZE)
                for i in range(0, n, READ_SIZE):
                    writer.write(block[:min(READ_SIZE, n - i)])
                    await writer.drain()
                await reader.readexactly(1)
                t0, t1, nbytes = marks["up"]
            else:
                writer.write(_HDR.pack(b"D", n))
                t0, t1, nbytes = await _receive_timed(reader, n, skip)
            writer.close()
            mbit = nbytes * 8 / (t1 - t0) / 1e6
            expected = rate * 8 / 1e6
            result[f"{direction}_mbit"] = {"expected": expected, "measured": round(mbit, 3),
                                           "bytes": nbytes, "seconds": round(t1 - t0, 3)}
            checks[direction] = abs(mbit - expected) <= 0.10 * expected
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def _summary_line(r: dict[str, object]) -> str:
    parts = [f"self-test {'PASS' if r['passed'] else 'FAIL'} profile={r['profile']}",
             f"emulator={EMULATOR}"]
    rtt = r["rtt_ms"]
    assert isinstance(rtt, dict)
    parts.append(f"rtt={rtt['median']:.2f}ms (expected {rtt['expected']:g}"
                 f"+-{rtt['tolerance_ms']:g})")
    for d in ("up", "down"):
        m = r.get(f"{d}_mbit")
        if isinstance(m, dict):
            parts.append(f"{d}={m['measured']:.2f}Mbit/s (expected {m['expected']:g})")
    return " ".join(parts)


# --------------------------------------------------------------------------- CLI


async def _serve(proxy: LinkProxy, as_json: bool) -> None:
    await proxy.start()
    host, port = proxy.address
    info = {"event": "listening", "listen": f"{host}:{port}",
            "upstream": f"{proxy.upstream[0]}:{proxy.upstream[1]}", **proxy.describe()}
    print(json.dumps(info) if as_json else
          f"netem: profile={proxy.profile.name} emulator={EMULATOR} "
          f"{host}:{port} -> {info['upstream']}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()
    print(json.dumps({"event": "closed", "emulator": EMULATOR, **proxy.stats})
          if as_json else f"netem: closed {proxy.stats}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", help="profile name (see --list-profiles)")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (loopback only)")
    ap.add_argument("--upstream", help="HOST:PORT of the real server (loopback only)")
    ap.add_argument("--list-profiles", action="store_true")
    ap.add_argument("--self-test", action="store_true",
                    help="measure RTT/throughput through the proxy; exit 1 if off by >10%%")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--seed", type=int, default=None, help="jitter RNG seed")
    ap.add_argument("--drop-every-s", type=float, default=0.0,
                    help="also reset every open connection this often (the profile is renamed "
                         "PROFILE-dropSs); 0 = never")
    ap.add_argument("--drop-silently", action="store_true",
                    help="drops leave the connections open but silent for good (PROFILE-silenceSs)")
    args = ap.parse_args(argv)
    if args.list_profiles:
        if args.json:
            print(json.dumps({"emulator": EMULATOR,
                              "profiles": [p.to_dict() for p in PROFILES.values()]}, indent=2))
        else:
            for p in PROFILES.values():
                print(f"{p.name:15} rtt={p.rtt_ms:g}ms jitter={p.jitter_ms:g}ms "
                      f"down={p.down_mbit}Mbit up={p.up_mbit}Mbit "
                      f"stall={p.stall_ms:g}ms/{p.stall_every_s:g}s  {p.description}")
        return 0
    if not args.profile:
        ap.error("--profile is required")
    try:
        args.profile = with_drops(args.profile, args.drop_every_s, args.drop_silently)
        if args.self_test:
            result = asyncio.run(self_test(args.profile, seed=1 if args.seed is None else args.seed))
            print(_summary_line(result))
            print(json.dumps(result))
            return 0 if result["passed"] else 1
        if not args.upstream:
            ap.error("--upstream is required")
        proxy = LinkProxy(args.profile, parse_hostport(args.listen),
                          parse_hostport(args.upstream), seed=args.seed)
    except ValueError as exc:
        print(f"netem: error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(proxy, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
