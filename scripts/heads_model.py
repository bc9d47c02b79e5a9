"""Medusa-style draft heads with a SlimSpec low-rank shared vocabulary projection (torch side).

Head k (k = 0..K-1) reads the target's final hidden state h_t (post final norm, so that
lm_head(h_t) gives the token at t+1, the round's root/bonus token) and predicts the token at
t+2+k:

    x_k      = h_t + C_k e(root)            root-conditioned (default); plain Medusa: x_k = h_t
    e(root)  = U[root] / rms(U[root])       C_k: r -> d per head, zero-initialised
    z_k      = ResBlock_k^L(x_k)            ResBlock(x) = x + SiLU(W x + b), W zero-initialised
    logits_k = U (A_k z_k)                  A_k: d -> r (per head), U: r -> V (shared)   [low rank]
    logits_k[F] += D_k z_k                  D_k: d -> |F|, F: frequent tokens   [low rank + dense rows]
    logits_k = W_k z_k                      W_k: d -> V (per head)                       [full rank]

`U A` starts as a truncated SVD of the target's LM head, so an untrained low-rank head 0 is
already a rank-r approximation of the target's own next-token distribution.

Dense rows for frequent tokens (`dense_tokens` = |F|, optional): the tokens the target writes
most also get a full-rank row, added to their low-rank logit. SmolLM2's 1,024 most frequent
training labels (2% of the vocabulary) are 74% of the held-out labels and 4,096 are 88%, and
most of rank 64's top-1 misses against full rank fall on them. |F| rows cost |F| x d against the
full-rank head's V x d. D starts as the LM head's SVD residual on F, so an untrained head 0
equals the target's LM head exactly there. D_k per head, or (`dense_shared`) one D for all heads,
which differ in z_k already: the same bytes then cover four times the tokens.

Root conditioning (our take on the Hydra/EAGLE idea): the device already knows token t+1 (the
round's root, the bonus token the server returned), so a head need not guess it. The root is
embedded with the vocabulary matrix the heads already carry, e = U[root] (weight tying, as the
target ties its embeddings: no second vocabulary-sized table, the artifact stays small), and
mapped into the hidden space by C_k: r -> d per head. C_k starts at zero, so training starts
exactly from the plain Medusa heads. The full-rank variant has no U; it gets its own
[V, ROOT_EMBED_RANK] table, initialised like U from the truncated SVD of the LM head, so that a
comparison between ranks is fair.

Only training, export and benchmarks import this module; the device never does.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # Medusa: the block starts as the identity
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


ROOT_EMBED_RANK = 64  # width of the full-rank variant's own root-embedding table (at most hidden_size)


def unit_rms(e: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each root embedding [.., r] to unit RMS.

    U's rows are small (norm ~0.3 for SmolLM2 against |h_t| ~45) and vary in size; the
    zero-initialised C_k is trained by Adam, whose steps are ~lr per parameter whatever the
    gradient's scale, so on raw rows C_k e would need thousands of steps to matter next to h_t.
    Normalised, it does within the first hundred.
    """
    return e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + eps)


class DraftHeads(nn.Module):
    """K heads; `rank=None` (or 0) is the full-rank variant with a d -> V projection per head.

    With `root_conditioned`, forward() also takes the round's root token (int64 [B]); a root
    of -1 means "unknown" and contributes nothing (training rows whose labels do not follow
    the stored root, see train_heads.load_split).
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int = 4,
        rank: int | None = 64,
        num_layers: int = 1,
        root_conditioned: bool = True,
        dense_tokens: int = 0,
        dense_shared: bool = False,
    ) -> None:
        super().__init__()
        if dense_tokens and not rank:
            raise ValueError("dense rows for frequent tokens complement a low-rank head; full rank has every row")
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_heads = num_heads
        self.rank = rank or None
        self.num_layers = num_layers
        self.root_conditioned = root_conditioned
        self.dense_tokens = dense_tokens
        self.dense_shared = bool(dense_tokens) and dense_shared
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)]) for _ in range(num_heads)
        )
        if self.rank:
            self.A = nn.Parameter(torch.empty(num_heads, self.rank, hidden_size))
            self.U = nn.Parameter(torch.empty(vocab_size, self.rank))
            nn.init.normal_(self.A, std=1.0 / math.sqrt(hidden_size))
            nn.init.normal_(self.U, std=1.0 / math.sqrt(self.rank))
            if dense_tokens:
                # which tokens get dense rows: set by init_from_lm_head (saved with the weights)
                self.register_buffer("dense_ids", torch.arange(dense_tokens))
                self.D = nn.Parameter(torch.zeros(1 if dense_shared else num_heads, dense_tokens, hidden_size))
        else:
            self.W = nn.Parameter(torch.empty(num_heads, vocab_size, hidden_size))
            nn.init.normal_(self.W, std=1.0 / math.sqrt(hidden_size))
        if root_conditioned:
            if not self.rank:
                width = min(ROOT_EMBED_RANK, hidden_size)
                self.E = nn.Parameter(torch.empty(vocab_size, width))
                nn.init.normal_(self.E, std=1.0 / math.sqrt(width))
            # C_k: r -> d, zero so that the untrained conditioned heads equal the plain ones
            self.C = nn.Parameter(torch.zeros(num_heads, hidden_size, self.root_table.shape[1]))

    @property
    def root_table(self) -> torch.Tensor:
        """[V, r] root-embedding table: the shared U (tied), or the full-rank variant's own E."""
        return self.U if self.rank else self.E

    def config(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_heads": self.num_heads,
            "rank": self.rank or 0,
            "num_layers": self.num_layers,
            "root_conditioned": self.root_conditioned,
            "dense_tokens": self.dense_tokens,
            "dense_shared": self.dense_shared,
        }

    @torch.no_grad()
    def init_from_lm_head(self, lm_head: torch.Tensor, dense_ids: torch.Tensor | None = None) -> float:
        """Initialise the vocabulary projection from the target's LM head [V, d].

        Low rank: lm_head ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T) by truncated SVD; every A_k starts
        as the same right factor; with dense rows, `dense_ids` names the frequent tokens and D
        starts as the approximation's residual on them. Full rank: each head starts as a copy of
        the LM head, and a root-conditioned head's own embedding table E starts as the
        rank-ROOT_EMBED_RANK left factor (what U would be). Returns the relative Frobenius error
        of the low-rank approximation (0 for full rank).
        """
        w = lm_head.detach().to(torch.float32)
        if not self.rank:
            self.W.copy_(w.unsqueeze(0).expand_as(self.W))
            if not self.root_conditioned:
                return 0.0
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = self.rank or self.E.shape[1]
        sq = s[:r].sqrt()
        if not self.rank:
            self.E.copy_(u[:, :r] * sq)
            return 0.0
        self.U.copy_(u[:, :r] * sq)
        self.A.copy_((sq[:, None] * vh[:r]).unsqueeze(0).expand_as(self.A))
        approx = (u[:, :r] * s[:r]) @ vh[:r]
        if self.dense_tokens:
            if dense_ids is None or dense_ids.shape != self.dense_ids.shape:
                raise ValueError(f"dense rows need the ids of the {self.dense_tokens} frequent tokens")
            self.dense_ids.copy_(dense_ids)
            self.D.copy_((w - approx)[dense_ids].unsqueeze(0).expand_as(self.D))
        return float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))

    def head_inputs(self, h: torch.Tensor, root: torch.Tensor | None) -> torch.Tensor:
        """[B, d] (+ root [B]) -> x_k [B, K, d]: h, plus C_k U[root] when root-conditioned."""
        x = h.unsqueeze(1).expand(-1, self.num_heads, -1)
        if not self.root_conditioned:
            return x
        if root is None:
            raise ValueError("root-conditioned heads need the round's root token")
        e = unit_rms(F.embedding(root.clamp(min=0), self.root_table)) * (root >= 0).unsqueeze(-1)  # [B, r]
        return x + torch.einsum("br,kdr->bkd", e, self.C)

    def features(self, h: torch.Tensor, root: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d] (+ root [B]) -> [B, K, d] after each head's residual blocks."""
        x = self.head_inputs(h, root)
        return torch.stack([blk(x[:, k]) for k, blk in enumerate(self.blocks)], dim=1)

    def forward(self, h: torch.Tensor, root: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d] and root int64 [B] (ignored by plain heads) -> logits [B, K, V]."""
        z = self.features(h, root)
        if self.rank:
            low = torch.einsum("bkd,krd->bkr", z, self.A)
            logits = low @ self.U.t()
            return self.add_dense(logits, z) if self.dense_tokens else logits
        return torch.einsum("bkd,kvd->bkv", z, self.W)

    def add_dense(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """logits [B, K, V] + the dense rows' logits of features z [B, K, d] at the frequent
        tokens' ids. Written as 2-D MatMuls against D (one for all heads when D is shared) and
        a scatter-add, so that the exported graph is quantizer-friendly (see export_heads)."""
        B, K, d = z.shape
        if self.dense_shared:
            dense = (z.reshape(B * K, d) @ self.D[0].t()).reshape(B, K, -1)
        else:
            dense = torch.stack([F.linear(z[:, k], self.D[k]) for k in range(K)], dim=1)
        n = dense.shape[-1]
        return logits.scatter_add(2, self.dense_ids.view(1, 1, n).expand(B, K, n), dense)


class TopKHeads(nn.Module):
    """The exported function: hidden [B, d], root int64 [B] -> (top-k ids [B, K, k] int64,
    log-probs [B, K, k])."""

    def __init__(self, heads: DraftHeads, top_k: int) -> None:
        super().__init__()
        self.heads = heads
        self.top_k = top_k

    def forward(self, hidden: torch.Tensor, root: torch.Tensor):
        logits = self.heads(hidden.to(torch.float32), root)
        logp = torch.log_softmax(logits, dim=-1)
        vals, ids = torch.topk(logp, self.top_k, dim=-1)
        return ids, vals


def head_loss(
    logits: torch.Tensor, labels: torch.Tensor, decay: float = 0.8
) -> tuple[torch.Tensor, list[float]]:
    """Medusa-1 loss: sum_k decay^k CE(head k); labels [B, K] with -1 = ignore."""
    B, K, V = logits.shape
    ce = F.cross_entropy(
        logits.reshape(B * K, V).float(), labels.reshape(B * K).long(), ignore_index=-1, reduction="none"
    ).view(B, K)
    valid = (labels >= 0).to(ce.dtype)
    per_head = (ce * valid).sum(0) / valid.sum(0).clamp(min=1)
    weights = decay ** torch.arange(K, dtype=ce.dtype, device=ce.device)
    return (weights * per_head).sum(), per_head.detach().tolist()


def build_heads(cfg: dict) -> DraftHeads:
    """Heads from a config() dict; configs from before root conditioning build plain heads."""
    return DraftHeads(
        cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"], cfg.get("rank") or None, cfg.get("num_layers", 1),
        cfg.get("root_conditioned", False), cfg.get("dense_tokens", 0), cfg.get("dense_shared", False),
    )
