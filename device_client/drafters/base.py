"""The proposer interface every device drafter implements."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from shared.tree import TokenTree


class Drafter(Protocol):
    """Proposes a token tree rooted at the last generated token.

    `context` holds every token so far (prompt + generated); its last entry is the root, the
    bonus token the server returned. `hidden` is the target's final hidden state at the node
    before the root (float32 [hidden_size]), present only when `needs_hidden_state` is True.
    The tree must have at most `budget` nodes, root included. `node_prices` are the server's
    prices of its nodes (Verdict.node_prices, see shared.tree.node_price): a drafter that
    knows each node's chance of being accepted stops at the first node below its price;
    drafters without calibrated chances (n-gram lookups, uncalibrated head trees) cannot tell
    and keep the budget alone; the server then judges their trees by what they yield
    (edge_server.budget.DeviceLink).
    """

    name: str
    needs_hidden_state: bool

    def propose(self, context: Sequence[int], hidden: np.ndarray | None, budget: int,
                node_prices: Sequence[float] = ()) -> TokenTree:
        ...
