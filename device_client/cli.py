"""`device-client`: draft on this device, verify on the edge server, stream the answer."""
from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
from collections.abc import Iterator

import grpc

from device_client import artifacts
from device_client.chat import Conversation
from device_client.drafters.base import Drafter
from device_client.session import MODES, Request, generate
from device_client.text import DeviceTokenizer, TextStream
from shared.cli_help import HelpWithDefaults
from shared.protocol import pb, rpc
from shared.tls import read_pem

DRAFTERS = ("auto", "none", "ngram", "heads")
# The unary calls (server info, artifacts) are retried by gRPC itself when the server cannot be
# reached for a moment; a broken Generate stream is resumed by device_client.session.generate.
# A lost connection is re-dialled within 0.2-2 s, not gRPC's default of up to 120 s; one that
# went silent (the network changed, no reset reached us) is found by keepalive pings within
# 3-4 s, not by TCP after many minutes. Pings go out only while a call is open: one a second,
# about 100 bytes each way, next to the kilobytes a second of verdicts.
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps({"methodConfig": [{
        "name": [{"service": "edgespec.v1.EdgeSpec", "method": m} for m in ("GetServerInfo", "FetchArtifact")],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]}}]})),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 1_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.http2.ping_timeout_ms", 3_000),  # what current gRPC waits for a ping's answer (default 60 s)
    ("grpc.http2.max_pings_without_data", 0),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="device-client", description=__doc__, formatter_class=HelpWithDefaults)
    p.add_argument("prompt", nargs="?", default=None,
                   help="the user message (or raw text with --raw); with --chat the first one (optional)")
    p.add_argument("--chat", action="store_true",
                   help="a conversation: after each answer the next user message is read from stdin, one "
                        "line each, until EOF; every turn sends the whole conversation, whose earlier "
                        "turns the server feeds from its prompt cache")
    p.add_argument("--server", default="127.0.0.1:50051",
                   help="edge server HOST:PORT, or several, comma-separated, running the same model: the first "
                        "that answers serves, and an answer whose server goes away resumes on the next")
    p.add_argument("--drafter", choices=DRAFTERS, default="auto",
                   help="auto: heads when the server ships heads for its model, else ngram")
    p.add_argument("--heads-tree", choices=["auto", "unified", "dynamic", "static"], default="auto",
                   help="heads: unified = one tree of head and prompt-lookup candidates by calibrated "
                        "acceptance (needs heads.json tree_calibration); dynamic = by cumulative log-prob, "
                        "lookups in a fixed share; static = the calibrated static tree; auto = unified when "
                        "calibrated, else dynamic (with a warning)")
    p.add_argument("--heads-ngram", choices=["on", "off"], default="on",
                   help="heads: merge prompt-lookup candidates into the heads' tree")
    p.add_argument("--draft-threads", type=int, default=1, help="onnxruntime threads for the heads")
    p.add_argument("--mode", choices=list(MODES), default="speculative",
                   help="speculative: lock-step rounds (the server waits for each draft it asks for, and "
                        "decodes alone while its budget is 1); pipelined: the "
                        "server decodes without waiting and verifies the latest draft when it arrives "
                        "(best on slow links); server-ar: the server decodes alone (baseline, no drafting)")
    p.add_argument("--tree-budget", type=int, default=16, help="most tree nodes per round, root included")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens of the answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, the target's own argmax")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1: off")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: off")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed: one seed gives one answer, with or without speculation (default: a "
                        "random one, reported in --json as `seed`)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="tokenize the prompt as is, no chat template")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens regardless of EOS")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole generation")
    p.add_argument("--reconnect-s", type=float, default=30.0,
                   help="when the connection breaks mid-answer, keep trying this many seconds to resume it "
                        "where it stopped (the same tokens as without the break); 0: fail at once")
    p.add_argument("--busy-wait-s", type=float, default=30.0,
                   help="when the server is full and refuses the answer for now, wait as long as it suggests "
                        "and ask again, for up to this many seconds; 0: fail at once")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with text and stats after the answer (after each, with --chat)")
    p.add_argument("--tls", action="store_true",
                   help="connect over TLS, trusting the system's CA certificates (implied by the --tls-* files)")
    p.add_argument("--tls-ca", help="PEM CA certificate(s) to trust for the server's certificate instead, e.g. "
                                    "a self-signed one")
    p.add_argument("--tls-cert", help="PEM certificate of this device, for a server that requires one "
                                      "(edge-server --tls-client-ca), with --tls-key")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.prompt is None and not args.chat:
        p.error("give the prompt, or --chat to read the messages from stdin")
    if args.chat and args.raw:
        p.error("--chat renders the conversation with the chat template; leave out --raw")
    if args.tree_budget < 1:
        p.error("--tree-budget must be at least 1 (the root)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        p.error("--temperature must be a finite number >= 0")
    if not 0.0 <= args.top_p <= 1.0:
        p.error("--top-p must be in [0, 1]")
    if args.top_k < 0:
        p.error("--top-k must be >= 0")
    if not args.timeout > 0:  # also nan
        p.error("--timeout must be a number of seconds above 0")
    if not args.reconnect_s >= 0:
        p.error("--reconnect-s must be a number of seconds >= 0")
    for server in args.server.split(","):
        if server.startswith(("http://", "https://")):
            p.error(f"--server takes HOST:PORT, not a URL (gRPC): try {server.split('://', 1)[1].rstrip('/')}")
        if ":" not in server:  # gRPC would dial port 443
            p.error(f"--server needs the port: {server}:50051 if the server runs with its default --port")
    if not args.busy_wait_s >= 0:
        p.error("--busy-wait-s must be a number of seconds >= 0")
    if args.seed is None:
        args.seed = secrets.randbits(63)
    elif not 0 <= args.seed < 2**64:
        p.error("--seed must be in 0..2^64-1")
    return args


def make_drafter(name: str, stub: rpc.EdgeSpecStub, info: pb.ServerInfo, heads_tree: str = "auto",
                 heads_ngram: bool = True, threads: int = 1) -> Drafter:
    """The drafter for `name`; heads come from the server's artifacts (cached by digest)."""
    has_heads = any(a.name == "heads.json" for a in info.artifacts)
    if name == "auto":
        name = "heads" if has_heads else "ngram"
    if name == "none":
        from device_client.drafters.none import NoDrafter
        return NoDrafter()
    if name == "ngram":
        from device_client.drafters.ngram import NgramDrafter
        return NgramDrafter()
    if not has_heads:
        raise SystemExit(f"the server ({info.model_name}) ships no drafter heads for its model; "
                         "use --drafter ngram, or train heads with scripts/train_heads.py")
    from device_client.drafters.heads import HeadsDrafter
    meta = artifacts.fetch_all(stub, info, ["heads.json"])["heads.json"]
    onnx_name = json.loads(meta.read_text()).get("onnx", "heads.int8.onnx")
    onnx = artifacts.fetch_all(stub, info, [onnx_name])[onnx_name]
    return HeadsDrafter(meta.parent, mode=heads_tree, ngram=heads_ngram, threads=threads,
                        model_file=str(onnx))


def load_tokenizer(stub: rpc.EdgeSpecStub, info: pb.ServerInfo) -> DeviceTokenizer:
    files = artifacts.fetch_all(stub, info, ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    if "tokenizer.json" not in files:
        raise SystemExit("the server offers no tokenizer.json artifact; it is not an EdgeSpec server")
    return DeviceTokenizer(files["tokenizer.json"], files.get("tokenizer_config.json"),
                           files.get("chat_template.jinja"))


def user_messages(args: argparse.Namespace) -> Iterator[str]:
    """The prompt, then with --chat every non-empty line of stdin until EOF."""
    if args.prompt is not None:
        yield args.prompt
    while args.chat:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _wants_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.tls_ca or args.tls_cert)


def open_channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    """Plaintext, or TLS when any --tls flag is given (see edge-server --tls-cert)."""
    if not _wants_tls(args):
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(args.tls_ca, "--tls-ca") if args.tls_ca else None,
        private_key=read_pem(args.tls_key, "--tls-key") if args.tls_key else None,
        certificate_chain=read_pem(args.tls_cert, "--tls-cert") if args.tls_cert else None)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


class EdgeServers:
    """The --server addresses. The first that answers serves; when it cannot be reached again
    mid-answer, or turns the stream away (it is shutting down), the answer moves on to the next
    one that answers and runs the same model and tokenizer, and goes on where it stopped."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.addresses = args, args.server.split(",")
        self._channels: dict[str, grpc.Channel] = {}
        self.at = 0
        self.info = pb.ServerInfo()

    def _stub(self, i: int) -> rpc.EdgeSpecStub:
        address = self.addresses[i]
        if address not in self._channels:
            self._channels[address] = open_channel(self.args, address)
        return rpc.EdgeSpecStub(self._channels[address])

    def connect(self) -> tuple[rpc.EdgeSpecStub, pb.ServerInfo]:
        """The first server that answers and its info; none answering is an error that says what
        to check."""
        unreachable = []
        for i, address in enumerate(self.addresses):
            try:
                self.info = self._stub(i).GetServerInfo(pb.ServerInfoRequest(), timeout=30)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                unreachable.append(f"{address} ({err.details()})")
                continue
            self.at = i
            return self._stub(i), self.info
        tls = ("If it serves plaintext, leave out the --tls flags; if TLS, --tls-ca must hold the CA that signed "
               "its certificate, and a server started with --tls-client-ca wants --tls-cert and --tls-key"
               if _wants_tls(self.args) else
               "If it serves TLS (edge-server --tls-cert), add --tls-ca with its CA certificate, or --tls")
        raise SystemExit(f"device-client: no edge server answered at {'; '.join(unreachable)}. "
                         f"Is one running there? {tls}.")

    @property
    def current(self) -> rpc.EdgeSpecStub:
        return self._stub(self.at)

    def failover(self) -> rpc.EdgeSpecStub | None:
        """The next server after this one that answers and runs the same model, or None."""
        for step in range(1, len(self.addresses)):
            i = (self.at + step) % len(self.addresses)
            try:
                info = self._stub(i).GetServerInfo(pb.ServerInfoRequest(), timeout=5)
            except grpc.RpcError:
                continue
            if (info.model_fingerprint, info.tokenizer_fingerprint) != (self.info.model_fingerprint,
                                                                        self.info.tokenizer_fingerprint):
                print(f"device-client: {self.addresses[i]} serves another model ({info.model_name}); "
                      "not resuming there", file=sys.stderr)
                continue
            print(f"device-client: resuming the answer on {self.addresses[i]}", file=sys.stderr)
            self.at = i
            return self._stub(i)
        return None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


class WaitingNotice:
    """Tells the user why nothing comes yet when the server is full: once on joining its line,
    once more when next (the places in between would flood the terminal)."""

    def __init__(self) -> None:
        self.told: int | None = None

    def __call__(self, ahead: int) -> None:
        if self.told is None or (ahead == 0 < self.told):
            where = "next in line" if ahead == 0 else f"{ahead} ahead"
            print(f"device-client: the server is full; waiting for room ({where})", file=sys.stderr, flush=True)
            self.told = ahead


def run(args: argparse.Namespace) -> Iterator[dict]:
    """Streams each answer to stdout and yields its record's summary (one, or one a turn)."""
    servers = EdgeServers(args)
    try:
        stub, info = servers.connect()
        tokenizer = load_tokenizer(stub, info)
        drafter = make_drafter(args.drafter, stub, info, args.heads_tree, args.heads_ngram == "on",
                               args.draft_threads)
        chat = Conversation(tokenizer, args.system, info.max_context, args.max_new_tokens)
        for message in user_messages(args):
            dropped = chat.dropped
            prompt_ids = tokenizer.raw_ids(message) if args.raw else chat.prompt_ids(message)
            if chat.dropped > dropped:
                print(f"device-client: the conversation outgrew the server's context ({info.max_context} tokens, "
                      f"{chat.answer_room} of them kept for the answer); dropped its {chat.dropped - dropped} "
                      f"oldest turn(s), {chat.dropped} so far", file=sys.stderr)
            stream = TextStream(tokenizer)

            def show(tokens: list[int]) -> None:
                sys.stdout.write(stream.push(tokens))
                sys.stdout.flush()

            request = Request(prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                              args.seed, min(args.tree_budget, info.max_tree_nodes),
                              mode=args.mode, ignore_eos=args.ignore_eos, max_context=info.max_context)
            record = generate(servers.current, request, drafter, info.tokenizer_fingerprint, on_tokens=show,
                              timeout=args.timeout, reconnect_s=args.reconnect_s,
                              busy_wait_s=args.busy_wait_s, on_waiting=WaitingNotice(), failover=servers.failover)
            record.text = tokenizer.decode(record.token_ids)
            chat.add(message, record.text)
            sys.stdout.write("\n")
            print(record.summary_line(), file=sys.stderr)
            summary = {**record.summary(), "seed": args.seed}
            yield {**summary, "chat_turns_dropped": chat.dropped} if args.chat else summary
    finally:
        servers.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        for summary in run(args):
            if args.json:
                print(json.dumps(summary), flush=True)
    except grpc.RpcError as err:
        raise SystemExit(f"device-client: server said {err.code().name}: {err.details()}") from None
    except KeyboardInterrupt:  # Ctrl-C: the answer so far stays on screen; the server frees the session
        print(file=sys.stdout, flush=True)
        print("device-client: stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
