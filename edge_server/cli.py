"""`edge-server`: serve a target model for device-edge speculative decoding."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import torch

from edge_server.hardware import DTYPES, keep_freed_memory, pick_device, pick_dtype
from shared.cli_help import HelpWithDefaults

if TYPE_CHECKING:
    import grpc

    from edge_server.metrics import ServerMetrics
    from edge_server.service import EdgeSpecService



# A device that vanishes without closing its connection (its network changed under it) is
# noticed by keepalive pings within 5-10 s, which frees its session (and keeps it for a
# resumption, edge_server.scheduler); one that comes back sooner names its old session, which
# ends then (Start.resume_session_id). Devices ping every second (device_client.cli), accepted here.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),  # what current gRPC waits for a ping's answer (default 60 s)
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share its connections
]

def _number(kind: type, minimum: float, above: bool = False):
    """An argparse type for a flag's number: `kind`, at least `minimum` (above it when `above`),
    so that a zero batch or chunk is refused at the command line, not met as a hang later."""
    def convert(text: str):
        try:
            value = kind(text)
            if not math.isfinite(value):
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if above else 'at least'} {minimum:g}")
        return value
    return convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edge-server", description=__doc__, formatter_class=HelpWithDefaults)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed at start)")
    p.add_argument("--model", default="default",
                   help="HuggingFace id or local path; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto = bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16/amx), else float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=_number(int, 0), default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--cpus", default="",
                   help="pin the server to these CPU cores, e.g. '0' or '0-3,6' (Linux; default: no pinning)")
    p.add_argument("--max-context", type=_number(int, 0), default=0, help="0 = the model's max positions")
    p.add_argument("--max-tree-nodes", type=_number(int, 1), default=128,
                   help="most nodes in a device's tree, root included")
    p.add_argument("--max-new-tokens", type=_number(int, 1), default=4096, help="most tokens one answer may ask for")
    p.add_argument("--max-sessions", type=_number(int, 1), default=64, help="sessions served at once")
    p.add_argument("--kv-budget-mb", type=_number(float, 0, above=True), default=2048.0,
                   help="KV cache memory for all sessions; a session reserves prompt + max_new_tokens + "
                        "one tree at admission, and waits in line while it does not fit")
    p.add_argument("--max-waiting", type=_number(int, 0), default=256,
                   help="streams that may wait in line, in arrival order, for a session slot or KV room; "
                        "beyond it a stream is refused (RESOURCE_EXHAUSTED with a retry hint)")
    p.add_argument("--admission-wait-s", type=_number(float, 0), default=30.0,
                   help="how long a stream waits in that line before it is refused; 0: refuse at once")
    p.add_argument("--drain-s", type=_number(float, 0), default=10.0,
                   help="on SIGTERM or Ctrl-C, how long running answers may go on to their end while new "
                        "streams are turned away (a second signal stops at once); then the rest are told "
                        "to resume elsewhere")
    p.add_argument("--idle-timeout", type=_number(float, 0, above=True), default=120.0,
                   help="seconds a device may stay silent before its session and KV are freed")
    p.add_argument("--max-batch-size", type=_number(int, 1), default=32, help="most sessions in one batched forward")
    p.add_argument("--max-batch-tokens", type=_number(int, 1), default=512, help="most tokens in one batched forward")
    p.add_argument("--prefill-chunk", type=_number(int, 1), default=128,
                   help="most prompt tokens of one session per step (long prompts are interleaved)")
    p.add_argument("--max-queued-prefill-tokens", type=_number(int, 1), default=16384,
                   help="prompt tokens admitted sessions may have waiting to be fed; a stream whose prompt "
                        "would pass it waits in line (a prompt longer than it alone is admitted once none wait)")
    p.add_argument("--prompt-cache-mb", type=_number(float, 0), default=512.0,
                   help="KV memory (within --kv-budget-mb) for prompt prefixes kept after their prefill, so a "
                        "prompt that starts the same way (a chat's next turn, another question on the same "
                        "document) skips them; given back to new sessions first; 0 = off")
    p.add_argument("--batch-window-ms", type=_number(float, 0), default=2.0,
                   help="how long a step waits for a device with no turnaround history yet")
    p.add_argument("--batch-window-max-ms", type=_number(float, 0), default=50.0,
                   help="most a step waits for devices expected back soon (never when all are ready)")
    p.add_argument("--fixed-budget", action="store_true",
                   help="always offer --max-tree-nodes as next_tree_budget (no load-aware speculation)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on --metrics-host at this port (0 picks a free "
                        "one, printed at start; default: off, GetMetrics still has them)")
    p.add_argument("--metrics-host", default=None,
                   help="address of the metrics endpoint (plain HTTP); default: --host. 127.0.0.1 keeps it "
                        "on this machine while devices reach --host")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--tls-cert", help="PEM certificate (chain) to serve over TLS, with --tls-key; without it the "
                                      "server speaks plaintext, for loopback or a network you trust. Replace the "
                                      "files to renew it: new connections get the new one, no restart")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA certificate(s): only devices presenting a certificate they "
                                           "signed may connect (mutual TLS)")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        p.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    return args


def parse_cpus(spec: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}; the message says what is wrong with a bad list."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SystemExit(f"--cpus {spec!r}: expected core numbers and ranges like '0' or '0-3,6'") from None
    cores = set(range(os.cpu_count() or 1))  # not this process's affinity: a parent may have narrowed it
    if not cpus or not cpus <= cores:
        raise SystemExit(f"--cpus {spec!r}: this machine has cores 0-{max(cores)}")
    return cpus


def pin_process(cpus: set[int]) -> None:
    """Pins every thread of the server: a thread keeps the affinity it was started with, and
    torch starts one at import, before the flags are read."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


async def serve(args: argparse.Namespace) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from edge_server import __version__
    from edge_server.artifacts import ArtifactStore
    from edge_server.kv_cache import KVBudgetError, KVPool
    from edge_server.metrics import ServerMetrics
    from edge_server.model_store import load_model, model_fingerprint
    from edge_server.scheduler import Scheduler, SchedulerConfig
    from edge_server.service import EdgeSpecService, Limits
    from edge_server.verifier import TargetModel
    from shared.protocol import pb, rpc

    log = logging.getLogger("edge-server")
    if args.cpus:
        pin_process(parse_cpus(args.cpus))
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    started = time.perf_counter()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    credentials = server_credentials(args)
    port = listen(server, args.host, args.port, credentials)  # before the model: a taken port fails at once
    try:
        loaded = load_model(args.model, dtype, device)
    except (OSError, ValueError) as err:  # transformers' words for a missing folder, name or file
        raise SystemExit(f"cannot load --model {args.model!r}: {str(err).splitlines()[0]} Give a folder holding "
                         "a HuggingFace causal LM (config.json, weights, tokenizer) or the name of one in the "
                         "local cache; without --model the embedded default model is served") from None
    fingerprint = model_fingerprint(loaded.model)
    max_ctx = args.max_context or int(getattr(loaded.model.config, "max_position_embeddings", 2048))
    target = TargetModel(loaded.model, max_ctx)
    artifacts = ArtifactStore()
    tok_fp = artifacts.add_tokenizer(loaded.tokenizer)
    heads = artifacts.add_heads(loaded.name, fingerprint)
    eos = loaded.model.generation_config.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    scheduler = Scheduler(
        target, KVPool.for_model(loaded.model, args.kv_budget_mb),
        SchedulerConfig(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                        prefill_chunk=args.prefill_chunk, max_queued_prefill_tokens=args.max_queued_prefill_tokens,
                        window_ms=args.batch_window_ms, window_max_ms=args.batch_window_max_ms,
                        adaptive_budget=not args.fixed_budget, prompt_cache_mb=args.prompt_cache_mb),
        args.max_tree_nodes, ServerMetrics())
    service = EdgeSpecService(
        target, loaded.name, fingerprint, eos_ids, artifacts, tok_fp,
        Limits(args.max_tree_nodes, args.max_new_tokens, args.max_sessions,
               args.idle_timeout, args.max_waiting, args.admission_wait_s), __version__, scheduler)
    try:
        target.warm_up(service.pool)
    except KVBudgetError:
        raise SystemExit(f"--kv-budget-mb {args.kv_budget_mb:g} holds {service.pool.budget_tokens} KV positions of "
                         f"{loaded.name} ({service.pool.bytes_per_token / 1024:.0f} KiB each), too few for any "
                         "session; give it more") from None
    if args.metrics_port is not None:
        serve_metrics(service.metrics, args.metrics_host or args.host, args.metrics_port)
    rpc.add_EdgeSpecServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["EdgeSpec"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(health.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    if not credentials and not is_loopback(args.host):
        log.warning("serving plaintext on %s: prompts and answers cross the network readable by anyone on the "
                    "way, and any device that reaches the port may use it; add --tls-cert and --tls-key "
                    "(and --tls-client-ca to admit only your devices)", args.host)
    log.info("serving %s (%s, %s, context %d, heads %s, KV budget %d positions, prompt cache up to %d of them, "
             "%s) in %.1fs", loaded.name, dtype, device, max_ctx, "yes" if heads else "no",
             service.pool.budget_tokens, min(service.scheduler.prompts.budget_tokens, service.pool.budget_tokens),
             "lean Llama-family forward" if target.llama_rows else "the model's own layers", time.perf_counter() - started)
    # the line tests and scripts wait for; keep its shape
    print(f"edge-server listening on {args.host}:{port}" + (" (TLS)" if credentials else ""), flush=True)

    stopping, now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: (now if stopping.is_set() else stopping).set())
    await stopping.wait()
    await health_servicer.enter_graceful_shutdown()
    await drain(service, args.drain_s, now, log)
    service.close_streams()
    await server.stop(grace=2.0)
    service.shutdown()


async def drain(service: "EdgeSpecService", seconds: float, now: asyncio.Event, log: logging.Logger) -> None:
    """Lets the running answers finish, for up to `seconds` or until `now` (a second signal),
    while new streams are turned away: a rolling restart then breaks no answer that ends in time,
    and the devices it turns away go to another server."""
    service.drain()
    if service.sessions and seconds > 0:
        log.info("stopping: %d answers may finish within %g s (signal again to stop now)",
                 len(service.sessions), seconds)
    end = time.perf_counter() + seconds
    while service.sessions and not now.is_set() and time.perf_counter() < end:
        await asyncio.sleep(0.05)


def listen(server: "grpc.aio.Server", host: str, port: int, credentials: "grpc.ServerCredentials | None") -> int:
    """Binds the port (TLS with credentials), or SystemExit when it is taken."""
    try:
        bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials else
                 server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:  # what current gRPC raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise SystemExit(f"cannot listen on {host}:{port} (in use?); pick another --port")
    return bound


def is_loopback(host: str) -> bool:
    """Whether --host keeps the server on this machine (where plaintext is fine)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def server_credentials(args: argparse.Namespace) -> "grpc.ServerCredentials | None":
    """TLS from --tls-cert/--tls-key (requiring device certificates with --tls-client-ca), read
    again whenever the files change (edge_server.tls_files), or None for plaintext."""
    if not args.tls_cert:
        return None
    from edge_server.tls_files import CertificateFiles

    return CertificateFiles(args.tls_cert, args.tls_key, args.tls_client_ca).credentials()


def serve_metrics(metrics: ServerMetrics, host: str, port: int) -> None:
    """Prometheus's HTTP endpoint, on its own thread (prometheus_client's server)."""
    from prometheus_client import start_http_server

    try:
        httpd, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as err:
        raise SystemExit(f"cannot serve metrics on {host}:{port} ({err}); pick another --metrics-port") from None
    print(f"edge-server metrics on http://{host}:{httpd.server_port}/metrics", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
