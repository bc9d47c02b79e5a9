"""Tests of the userspace link emulator (scripts/netem.py) and a syntax check of netem_ns.sh.

Everything runs on loopback with small custom profiles so the file takes a few seconds even
on a busy 2-core machine; timing assertions use medians and generous upper tolerances
(scheduling noise only ever makes things slower).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETEM_PY = ROOT / "scripts" / "netem.py"
NETEM_NS = ROOT / "scripts" / "netem_ns.sh"


def _load_netem():
    """scripts/ is not a package: load the module from its file path."""
    spec = importlib.util.spec_from_file_location("netem", NETEM_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["netem"] = module  # dataclasses look the module up while it executes
    spec.loader.exec_module(module)
    return module


netem = _load_netem()
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def arun(coro: Awaitable[object], timeout: float = 30.0) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def profile(delay_ms: float = 1.0, mbit: float | None = None, **kw: object):
    return netem.Profile("test", delay_ms, mbit, mbit, **kw)


def handler(fn: Handler) -> Handler:
    """Upstream handlers: ignore resets/cancellation at teardown, always close."""
    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await fn(r, w)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            w.close()
    return wrapped


@handler
async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


@contextlib.asynccontextmanager
async def proxied(prof, upstream: Handler) -> AsyncIterator:
    """An upstream server on an ephemeral port behind a LinkProxy; yields the proxy."""
    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    proxy = netem.LinkProxy(prof, ("127.0.0.1", 0), server.sockets[0].getsockname()[:2],
                            seed=0)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def read_all(r: asyncio.StreamReader) -> bytes:
    chunks = []
    while data := await r.read(65536):
        chunks.append(data)
    return b"".join(chunks)


async def ping_rtts(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        w.write(b"x" * 32)
        await r.readexactly(32)
        out.append((time.perf_counter() - t) * 1000)
    return out


async def wait_until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --------------------------------------------------------------------------- profiles


def test_profile_table_is_valid() -> None:
    required = {"lan", "wifi", "5g", "4g", "3g", "satellite"}
    grid = {f"rtt{r}-{m}mbit" for r in (20, 50) for m in (10, 50, 100)}
    assert required | grid <= set(netem.PROFILES)
    for name, p in netem.PROFILES.items():
        assert p.name == name
        assert p.delay_ms > 0 and p.up_mbit > 0 and p.down_mbit > 0, name
        assert 0 <= p.jitter_ms <= p.delay_ms, name
        assert p.source and p.description, name
        assert p.burst("up") >= netem.MIN_QUANTUM and p.burst("down") >= netem.MIN_QUANTUM
        if p.stall_ms:
            assert 0 < p.stall_ms < p.stall_every_s * 1000, name
    for name in grid:
        p = netem.PROFILES[name]
        rtt, mbit = name[3:].split("-")
        assert p.rtt_ms == int(rtt) and p.up_mbit == p.down_mbit == int(mbit[:-4])
        assert p.jitter_ms == 0 and p.stall_ms == 0


@pytest.mark.parametrize("bad", [
    dict(delay_ms=-1), dict(mbit=0), dict(jitter_ms=-2),
    dict(stall_every_s=1, stall_ms=1000), dict(stall_ms=10), dict(burst_bytes=10), dict(drop_every_s=-1),
])
def test_profile_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        profile(**bad)


def test_list_profiles_json_cli() -> None:
    out = subprocess.run([sys.executable, str(NETEM_PY), "--list-profiles", "--json"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    doc = json.loads(out)
    assert doc["emulator"] == "userspace-proxy"
    assert [p["name"] for p in doc["profiles"]] == list(netem.PROFILES)
    assert all(p["rtt_ms"] == 2 * p["delay_ms"] for p in doc["profiles"])


@pytest.mark.parametrize("listen,upstream", [
    (("0.0.0.0", 0), ("127.0.0.1", 1)),
    (("127.0.0.1", 0), ("10.0.0.1", 80)),
    (("127.0.0.1", 0), ("8.8.8.8", 53)),
])
def test_refuses_non_loopback(listen: tuple, upstream: tuple) -> None:
    with pytest.raises(ValueError, match="not loopback"):
        netem.LinkProxy(profile(), listen, upstream)


def test_cli_refuses_non_loopback_with_clear_error() -> None:
    proc = subprocess.run([sys.executable, str(NETEM_PY), "--profile", "lan", "--listen",
                           "0.0.0.0:0", "--upstream", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not loopback" in proc.stderr


# --------------------------------------------------------------------------- link model


def test_link_model_jitter_keeps_order_and_varies_delay() -> None:
    link = netem.LinkModel(profile(10, jitter_ms=9), "up", 0.0, random.Random(1))
    arrivals = [i * 0.0001 for i in range(2000)]
    releases = [link.schedule(100, t) for t in arrivals]
    assert all(b >= a for a, b in zip(releases, releases[1:]))
    delays = [r - a for r, a in zip(releases, arrivals)]
    assert min(delays) >= 0.001 - 1e-9 and max(delays) <= 0.019 + 1e-9
    # spaced-out chunks (no queueing behind a predecessor) see the jitter itself
    spaced = [link.schedule(100, 1 + i * 0.05) - (1 + i * 0.05) for i in range(200)]
    assert statistics.pstdev(spaced) > 0.003


def test_link_model_rate_and_burst() -> None:
    p = profile(10, mbit=0.8, burst_bytes=10_000)  # 100 kB/s
    link = netem.LinkModel(p, "down", 0.0, random.Random(0))
    releases = [link.schedule(1000, 0.0) for _ in range(100)]
    assert releases[9] == pytest.approx(0.010)  # the burst leaves at once
    assert releases[-1] == pytest.approx((100_000 - 10_000) / 100_000 + 0.010)


def test_link_model_stall_holds_bytes() -> None:
    link = netem.LinkModel(profile(1, stall_every_s=1.0, stall_ms=200), "up", 0.0,
                           random.Random(0))
    assert link.schedule(10, 0.5) == pytest.approx(0.501)
    assert link.schedule(10, 0.9995) == pytest.approx(1.2)  # due in the stall: held
    assert link.schedule(10, 1.05) == pytest.approx(1.201)  # sent in it: waits for its end


# --------------------------------------------------------------------------- forwarding


def test_forwards_large_payloads_both_ways_exactly() -> None:
    a, b = os.urandom(4 << 20), os.urandom(4 << 20)
    got_up: list[bytes] = []

    @handler
    async def exchange(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b)
        w.write_eof()
        got_up.append(await read_all(r))

    async def main() -> bytes:
        async with proxied(profile(1), exchange) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            w.write(a)
            w.write_eof()
            down = await read_all(r)
            w.close()
            await wait_until(lambda: bool(got_up))
            return down

    assert arun(main()) == b
    assert got_up == [a]


def test_many_small_messages_interleaved_with_jitter_keep_order() -> None:
    rng = random.Random(7)
    msgs = [struct.pack("!I", i) + rng.randbytes(rng.randint(0, 200)) for i in range(2000)]
    sent = b"".join(msgs)

    async def main() -> bytes:
        # jitter as large as the delay would reorder packets in netem; never bytes here
        async with proxied(profile(4, jitter_ms=4), echo) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)

            async def writer() -> None:
                for i, m in enumerate(msgs):
                    w.write(m)
                    if i % 10 == 0:
                        await w.drain()
                        await asyncio.sleep(0)  # let replies interleave with requests
                w.write_eof()

            got, _ = await asyncio.gather(read_all(r), writer())
            w.close()
            return got

    assert arun(main()) == sent


def test_many_concurrent_connections() -> None:
    async def one(addr: tuple[str, int], i: int) -> bool:
        r, w = await asyncio.open_connection(*addr)
        payload = b"".join(struct.pack("!II", i, k) for k in range(50))
        for k in range(0, len(payload), 40):
            w.write(payload[k:k + 40])
            await asyncio.sleep(0)
        w.write_eof()
        ok = await read_all(r) == payload
        w.close()
        return ok

    async def main() -> tuple[list[bool], int, int]:
        async with proxied(profile(2, mbit=100), echo) as proxy:
            results = await asyncio.gather(*(one(proxy.address, i) for i in range(60)))
            await wait_until(lambda: proxy.stats["active"] == 0)
            return list(results), proxy.stats["connections"], proxy.stats["active"]

    results, total, active = arun(main())
    assert all(results) and total == 60 and active == 0


# --------------------------------------------------------------------------- timing


def test_delay_gives_expected_rtt() -> None:
    async def main() -> list[float]:
        async with proxied(profile(30), echo) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            rtts = await ping_rtts(r, w, 9)
            w.close()
            return rtts

    med = statistics.median(arun(main()))
    assert 58.0 <= med <= 85.0, med  # CPU starvation on a shared box only adds


def test_rate_limit_both_directions() -> None:
    n = 1 << 20
    p = profile(5, mbit=4.0)  # 500 kB/s each way; a 1 MiB transfer takes ~2.1 s
    marks: dict[str, float] = {}

    @handler
    async def exchange(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(bytes(n))
        w.write_eof()
        data = await r.readexactly(n)
        marks["up_done"] = time.perf_counter()
        assert len(data) == n

    async def main() -> tuple[float, float]:
        async with proxied(p, exchange) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            t0 = time.perf_counter()
            w.write(bytes(n))
            await r.readexactly(n)
            t_down = time.perf_counter() - t0
            await wait_until(lambda: "up_done" in marks, 10)
            w.close()
            return marks["up_done"] - t0, t_down

    t_up, t_down = arun(main())
    expected = (n - p.burst("up")) / p.rate_bps("up") + 0.005
    for t in (t_up, t_down):
        assert abs(t - expected) <= 0.15 * expected, (t, expected)


def test_scheduled_stall_blocks_traffic() -> None:
    async def main() -> list[float]:
        p = profile(1, stall_every_s=0.4, stall_ms=150)
        async with proxied(p, echo) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            rtts = []
            end = time.monotonic() + 0.65
            while time.monotonic() < end:
                rtts += await ping_rtts(r, w, 1)
                await asyncio.sleep(0.005)
            w.close()
            return rtts

    rtts = arun(main())
    assert statistics.median(rtts) < 10
    assert 100 <= max(rtts) <= 200, max(rtts)


def test_drops_reset_open_connections_and_let_new_ones_through() -> None:
    async def main() -> tuple[float, list[float], dict]:
        async with proxied(profile(1, drop_every_s=0.3), echo) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            t0 = time.monotonic()
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                while time.monotonic() - t0 < 2:
                    await ping_rtts(r, w, 1)
            reset_after = time.monotonic() - t0
            w.close()
            r, w = await asyncio.open_connection(*proxy.address)
            rtts = await ping_rtts(r, w, 3)
            w.close()
            return reset_after, rtts, dict(proxy.stats)

    reset_after, rtts, stats = arun(main())
    assert reset_after < 0.6 and stats["dropped"] >= 1
    assert statistics.median(rtts) < 10


def test_silent_drops_leave_connections_open_and_mute() -> None:
    async def main() -> tuple[list[float], list[float]]:
        async with proxied(profile(1, drop_every_s=1.0, drop_silently=True), echo) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            await asyncio.sleep(1.1)  # after the first drop, well before the next
            w.write(b"x" * 32)
            with pytest.raises(asyncio.TimeoutError):  # no answer, and no reset either
                await asyncio.wait_for(r.readexactly(32), 0.3)
            r2, w2 = await asyncio.open_connection(*proxy.address)
            rtts = await ping_rtts(r2, w2, 3)
            for writer in (w, w2):
                writer.close()
            return rtts, proxy.stats["dropped"]

    rtts, dropped = arun(main())
    assert dropped >= 1 and statistics.median(rtts) < 10


def test_a_side_giving_up_a_silenced_connection_goes_unnoticed_by_the_other() -> None:
    """The device that finds its connection dead closes it, reset and all; on the real link
    that reaches no one, so the server must find out by itself (its keepalives)."""
    ended = asyncio.Event()

    @handler
    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await r.read()
        ended.set()

    async def run() -> tuple[bool, bool]:
        async with proxied(profile(1, drop_every_s=0.5, drop_silently=True), upstream) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            await asyncio.sleep(0.6)  # after the first drop
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()  # with linger 0 a reset, not a FIN
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), 1.0)
            heard_while_silenced = ended.is_set()
        return heard_while_silenced, proxy.stats["dropped"] >= 1

    heard, dropped = arun(run())
    assert dropped and not heard


def test_cli_drop_every_s_renames_the_profile() -> None:
    proc = subprocess.run([sys.executable, str(NETEM_PY), "--profile", "lan", "--drop-every-s", "-2",
                           "--upstream", "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "drop_every_s must be >= 0" in proc.stderr
    proc = subprocess.Popen([sys.executable, str(NETEM_PY), "--profile", "lan", "--drop-every-s", "2.5",
                             "--upstream", "127.0.0.1:1", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        listening = json.loads(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(30)
    assert listening["profile"]["name"] == "lan-drop2.5s" and listening["profile"]["drop_every_s"] == 2.5


# --------------------------------------------------------------------------- closing


def test_half_close_and_eof_propagate() -> None:
    @handler
    async def replier(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await read_all(r)  # only ends if the client's FIN came through
        w.write(b"reply to " + request)
        await w.drain()

    async def main() -> bytes:
        async with proxied(profile(3), replier) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            w.write(b"hello")
            w.write_eof()  # half-close: we can still receive
            got = await read_all(r)  # ends with the upstream's FIN
            w.close()
            await wait_until(lambda: proxy.stats["active"] == 0)
            assert proxy.stats["active"] == 0
            return got

    assert arun(main()) == b"reply to hello"


def test_client_disconnect_closes_upstream() -> None:
    seen: list[bytes] = []

    @handler
    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await read_all(r))  # returns on EOF (or a reset, via the wrapper)

    async def main() -> int:
        async with proxied(profile(2), sink) as proxy:
            _, w = await asyncio.open_connection(*proxy.address)
            w.write(b"bye")
            await w.drain()
            w.close()
            assert await wait_until(lambda: bool(seen))
            await wait_until(lambda: proxy.stats["active"] == 0)
            return proxy.stats["active"]

    assert arun(main()) == 0
    assert seen == [b"bye"]


def test_upstream_close_and_refusal_reach_client() -> None:
    @handler
    async def short(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"x")

    async def main() -> tuple[bytes, bytes, int]:
        async with proxied(profile(2), short) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            got = await read_all(r)
            w.close()
        with socket.socket() as s:  # a port with nobody listening
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()
        proxy = netem.LinkProxy(profile(2), ("127.0.0.1", 0), dead)
        await proxy.start()
        r, w = await asyncio.open_connection(*proxy.address)
        try:
            refused = await read_all(r)
        except ConnectionResetError:
            refused = b""
        w.close()
        await proxy.close()
        return got, refused, proxy.stats["upstream_failures"]

    assert arun(main()) == (b"x", b"", 1)


# --------------------------------------------------------------------------- helpers / CLI


class _BlockingEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def test_run_proxy_in_thread_with_blocking_client() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _BlockingEcho) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with netem.run_proxy_in_thread(profile(10), upstream=server.server_address) \
                    as (host, port):
                with socket.create_connection((host, port), timeout=5) as s:
                    rtts = []
                    for _ in range(5):
                        t = time.perf_counter()
                        s.sendall(b"ping")
                        assert s.recv(16) == b"ping"
                        rtts.append((time.perf_counter() - t) * 1000)
        finally:
            server.shutdown()
    assert 19.0 <= statistics.median(rtts) <= 35.0


def test_self_test_measures_and_labels_emulator() -> None:
    result = arun(netem.self_test(netem.Profile("quick", 10, 20, 8), seconds=0.4))
    assert result["emulator"] == "userspace-proxy"
    assert set(result["checks"]) == {"rtt", "up", "down"}
    assert result["checks"]["up"] and result["checks"]["down"], result
    # the RTT check itself is strict (10 %); a CPU-starved run can only be slower
    assert 19.0 <= result["rtt_ms"]["median"] <= 35.0, result
    assert result["passed"] == all(result["checks"].values())


def test_netem_ns_script_syntax_and_help() -> None:
    subprocess.run(["bash", "-n", str(NETEM_NS)], check=True, timeout=10)
    proc = subprocess.run(["bash", str(NETEM_NS), "help"], capture_output=True, text=True,
                          timeout=10)
    assert proc.returncode == 0 and "up" in proc.stdout and "down" in proc.stdout
