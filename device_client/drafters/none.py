"""No speculation: one token per round trip, the baseline that shows what drafting buys."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from shared.tree import TokenTree


class NoDrafter:
    name = "none"
    needs_hidden_state = False

    def propose(self, context: Sequence[int], hidden: np.ndarray | None, budget: int,
                node_prices: Sequence[float] = ()) -> TokenTree:
        return TokenTree.root_only(context[-1])
