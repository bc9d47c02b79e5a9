"""What a generation reports: one record type for the client, the CLI and the benchmarks.

Inter-token latency is amortised per round: the k tokens a verdict brings share the time
since the previous verdict equally, which is what a reader of the stream experiences on
average. Bytes are protobuf payloads plus gRPC's 5-byte message prefix; HTTP/2 and TCP
framing are not included.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

GRPC_PREFIX_BYTES = 5


@dataclass
class GenerationRecord:
    text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    drafter: str = ""
    mode: str = "speculative"
    rounds: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    ttft_ms: float = 0.0
    cached_prompt_tokens: int = 0  # leading prompt tokens the server had kept from an earlier prompt
    total_ms: float = 0.0
    itl_ms: list[float] = field(default_factory=list)
    longest_pause_ms: float = 0.0  # the longest wait for tokens after the first (a broken stream's included)
    server_compute_ms: float = 0.0
    server_queue_ms: float = 0.0
    draft_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    reconnects: int = 0  # streams that resumed the generation after the one before broke
    busy_refusals: int = 0  # streams a busy server refused, each tried again after the wait it asked for
    busy_wait_ms: float = 0.0  # the time spent waiting so
    line_wait_ms: float = 0.0  # time spent in a full server's admission line (its Waiting messages)

    def summary(self) -> dict:
        """The record with derived statistics, as printed by --json."""
        out = asdict(self)
        itl = np.asarray(self.itl_ms) if self.itl_ms else np.zeros(1)
        out.pop("itl_ms")
        n = len(self.token_ids)
        out.update(
            mean_accepted=float(np.mean(self.accepted_per_round)) if self.accepted_per_round else 0.0,
            tokens_per_s=n / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0,
            itl_ms_p50=float(np.percentile(itl, 50)),
            itl_ms_p95=float(np.percentile(itl, 95)),
            ms_per_round=(self.total_ms - self.ttft_ms) / self.rounds if self.rounds else 0.0,
            server_ms_per_round=self.server_compute_ms / self.rounds if self.rounds else 0.0,
            draft_ms_per_round=self.draft_ms / self.rounds if self.rounds else 0.0,
            bytes_up_per_round=self.bytes_up / max(self.rounds, 1),
            bytes_down_per_round=self.bytes_down / max(self.rounds, 1),
            bytes_per_token=(self.bytes_up + self.bytes_down) / max(n, 1),
        )
        return out

    def _cached(self) -> str:
        if not self.cached_prompt_tokens:
            return ""
        return f" ({self.cached_prompt_tokens} of {len(self.prompt_token_ids)} prompt tokens cached)"

    def summary_line(self) -> str:
        s = self.summary()
        return (f"[{self.drafter}] {len(self.token_ids)} tokens in {self.rounds} rounds "
                f"(τ={s['mean_accepted']:.2f} tokens/round), {s['tokens_per_s']:.1f} tok/s, "
                f"TTFT {self.ttft_ms:.0f} ms{self._cached()}, ITL p50/p95 {s['itl_ms_p50']:.1f}/{s['itl_ms_p95']:.1f} ms, "
                f"server {s['server_ms_per_round']:.1f} ms/round, "
                f"{self.bytes_up} B up / {self.bytes_down} B down, finish={self.finish_reason}"
                + (f", resumed after {self.reconnects} broken stream(s)" if self.reconnects else "")
                + (f", waited {self.line_wait_ms / 1e3:.1f} s in the server's line" if self.line_wait_ms else "")
                + (f", waited {self.busy_wait_ms / 1e3:.1f} s for a busy server ({self.busy_refusals} refusal(s))"
                   if self.busy_refusals else ""))
