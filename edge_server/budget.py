"""Load-aware tree budgets, tuned by the tokens/s the server measures at each budget.

Why measured rather than modelled: what a bigger tree buys depends on the drafter's acceptance
at that size, on how a step's cost grows with its tokens and rows, and, in lock-step mode, on
how long the devices take to answer. On a CPU the step cost is far from linear (one token
~56-70 ms, 2-8 tokens ~90-110 ms, 8 rows x 2 tokens 1.2-1.6x 8 rows x 1, with run-to-run
noise of that size), and a least-squares cost model fitted on the narrow range of steps the
server happens to run mispriced trees under load: heads fell 12-20% below server-only decoding
at 4-8 clients. The objective itself, generated tokens per second of server time, is cheap to
measure, so the controller climbs it directly:

- The level is the tree budget (nodes, root included) that every speculative session is given
  for its next round: 1, 2, 4, ... up to `max_nodes`, or up to the largest cap its devices
  declared (Start.tree_budget): levels no device fills would measure the same and stall the
  climb. Level 1 means decoding alone.
- Each load (the number of sessions, rounded up to a power of two) keeps its own table of
  tokens/s per level, so what was learned at 8 clients is reused when 8 clients return. A load
  seen for the first time starts from the level of the nearest smaller load it knows, divided
  by the growth in sessions (more sessions, smaller trees), or about START_NODES tree nodes per
  step in all (8 for one session, 1 for eight): a guess that is right on a CPU, and a GPU,
  where wide steps are nearly free, climbs from it.
- An epoch runs one level for at least MIN_STEPS steps and MIN_ROWS session-rounds and measures
  its rate: expected tokens / seconds (each step's compute plus the wait before it, so slower
  device answers count). After a level change one step is not sampled: the trees in flight were
  drafted under the old budget. Steps that carry prompt chunks are not sampled either: prompts
  cost the same at every level.
- Expected, not counted, tokens: the tokens one round yields are geometric-like (1-5 at τ 2), so
  an epoch of ~15 rounds counted 10-20% more or fewer tokens than the same level's next epoch,
  which let a probe win by luck (at 4 clients heads ended on a level up to 30% slower than
  decoding alone in 4 of 6 runs). Each round instead counts the tokens its tree size yields on
  average, from `NodeAcceptance`: every tree builder adds nodes best first, so a smaller budget's
  tree is the first nodes of a larger one, and each verified round tells which of its node
  indices were accepted: 1 + the acceptance rates of nodes 1..b-1 is what a b-node round yields,
  learned from all recent rounds at b nodes or more. Decoding alone yields exactly 1.
- The controller stays at its level and, when one is due, probes a neighbouring level.
  On this shared CPU one epoch's rate varies by 10-15% with nothing changed, more than most
  differences between neighbouring levels, so a probe is a paired comparison: the epoch before
  it, then probe, level, probe, and the two levels' tokens/s over those epochs are compared
  (slow drifts of the machine or the text hit both alike). A larger tree wins only by beating
  the smaller one by MARGIN, whichever of them is probed: under load the rate falls faster past
  the best level than before it (at 4 clients on this CPU fixed budgets 1 / 2 / 4 / 8 gave 1.01 /
  1.00 / 0.93 / 0.84x of server-only decoding), so near-ties go to the smaller tree. (8% lost
  a lone session 10-15%: every step up from 4 nodes gains less than that, all of them together
  more.) A winning probe becomes the level and the next probe continues that way at once; a
  losing one sends it back and flips the direction.
- Text changes how much a tree yields, not what a round costs, so each probe also keeps the
  two levels' rounds (the tree size each had) and seconds, and after every epoch the current
  level is compared with the next smaller one at the acceptance of the latest rounds: when it
  no longer wins by MARGIN the controller steps down at once, without a probe, and probes that
  pair again after a wait. A level is valued by the trees its rounds had, not by its budget:
  pipelined devices whose drafts come late leave many rounds at the root alone (at 16 clients
  on this CPU only a quarter of the steps at 4 nodes verified a tree), and valued as full
  trees such a level beat decoding alone in probes while serving 4-16% fewer tokens.
  (Answers become less predictable after their opening tokens: the shipped heads accepted 2.0
  tokens a 4-node round in the first 32 tokens of the benchmark's answers and 1.6 over 64.)
- The level caps every round at the same size, but rounds differ: a device that can tell a
  node's chance of acceptance (the calibrated heads) should spend nodes where they are likely
  to be accepted. The verdict therefore also carries the price of each node, as a
  probability (`node_prices`): a node adds p tokens and costs c model seconds, which pays while
  p > c x R, R the tokens/s at the current level. c is what a token costs in steps of the
  tree's size: the slope of model seconds over tokens across the steps of the probes of the
  two levels around that size (paired, as the rates are): the second node is priced by the
  1-2 probes, the third and fourth by the 2-4 probes, and so on up to the level. A pair not
  probed yet borrows what a larger probe's smaller steps cost a token (never more than that
  probe's own slope), else the nearest measured pair's slope; until a probe has measured one,
  every node pays. Per pair, because a step's cost is not linear in its tokens: on an AVX2 CPU
  in fp32 one session's first extra token turns a matrix-vector step into a matrix one (~25
  ms), the next few cost ~3 ms each; in bf16 on oneDNN (products padded to 4 rows) one
  session's tokens 2-4 cost ~1 ms each and 5-16 ~2.4-4 ms. One price for all of a level's
  nodes, that of its largest pair, cut the cheap nodes too: at one client the level of 8 nodes
  at a price of 0.10 drafted 3.3 nodes a round, τ 1.84, where 4 nodes fixed got τ 1.96 at the
  same step time (42.5 against 45.2 tokens/s); per-node prices got 1.11x there, the median of
  ten pairs (sweep W in results/summary/load.md). With 8-node trees fixed at 4 clients a
  hand-set price of 0.15 shrank trees from 8 to ~2.5 nodes, steps from 262 to 129 ms and tokens
  a round from 1.72 to 1.42: 0.67x of server-only decoding became 0.94x. A probe keeps the prices of the
  level it started from (a larger probe's extra nodes pay the last of them), so a node index
  means the same thing at the two levels it compares.
- Each (level, neighbour) pair keeps its own wait before it is probed again, so a smaller level
  that lost says nothing about a larger one. A pair that loses again waits twice as long (at
  most MAX_WAIT epochs), and at least long enough that re-checking a level that lost by a
  share `loss` costs under EXPLORE of the server's throughput (PROBE_EPOCHS x loss x slower /
  wait, `slower` the loser's seconds a step over the winner's: epochs count steps, and a larger
  tree's steps, with the wait for lock-step devices' trees, take longer: 67 against 40 ms at 8
  clients on this CPU): a 2-node tree that lost 10% at 8 clients with steps 1.6x as long waits
  16 epochs, a close call waits 2 and is measured again soon. Doubling alone spent a fifth of a
  short run's steps on such probes at 8-16 lock-step clients (each probe epoch 10-27% slower),
  which kept heads 7-10% under server-only decoding. A smaller level that just lost to a larger one waits at least 3 epochs
  (its loss is at least MARGIN's), so one noisy probe back does not undo a win at once.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.tree import nodes_price

log = logging.getLogger("edge-server.budget")


@dataclass
class _Load:
    """What the controller knows and does at one load."""

    level: int
    rates: dict[int, float] = field(default_factory=dict)  # level -> measured tokens/s
    epochs: int = 0  # epochs measured here outside probes: the clock of `due`
    due: dict[tuple[int, int], int] = field(default_factory=dict)  # (level, neighbour) -> epoch it may be probed
    waits: dict[tuple[int, int], int] = field(default_factory=dict)  # (level, neighbour) -> its last wait
    direction: int = -1  # the preferred probe: -1 the next smaller level, +1 the next larger one
    probing_from: int | None = None  # the level to return to if the running probe loses
    schedule: list[int] = field(default_factory=list)  # the running probe's epochs still to come
    trial: dict[int, _Epoch] = field(default_factory=dict)  # level -> its rounds and seconds in the probe
    probed: dict[tuple[int, int], tuple[_Epoch, _Epoch]] = field(default_factory=dict)  # (smaller, larger)
    # -> the rounds and seconds each had in their last probe
    token_s: dict[tuple[int, int], float] = field(default_factory=dict)  # (smaller, larger) -> model
    # seconds a token adds to a step between them, measured in their probes
    token_s_below: dict[int, float] = field(default_factory=dict)  # smaller -> model seconds a token
    # adds to steps of at most `smaller` tokens a row, from the same probes' smaller steps


@dataclass
class _Epoch:
    steps: int = 0
    seconds: float = 0.0
    sizes: list[int] = field(default_factory=list)  # the tree size of every round
    costs: list[tuple[int, int, float]] = field(default_factory=list)  # each step's rows, tokens and
    # model seconds

    def add(self, other: "_Epoch") -> None:
        self.steps, self.seconds = self.steps + other.steps, self.seconds + other.seconds
        self.sizes.extend(other.sizes)
        self.costs.extend(other.costs)


class NodeAcceptance:
    """How often each node index of a round's tree was on its accepted path, over recent rounds
    (a count that decays by DECAY a round, so drifting text and drafters are followed)."""

    DECAY = 1.0 - 1.0 / 256

    def __init__(self, max_nodes: int) -> None:
        self.seen = np.zeros(max_nodes + 1)
        self.hits = np.zeros(max_nodes + 1)

    def add(self, size: int, path: Sequence[int]) -> None:
        """One verified round: its tree's node count and the accepted path (root first)."""
        self.seen *= self.DECAY
        self.hits *= self.DECAY
        self.seen[1:size] += 1
        self.hits[list(path[1:])] += 1

    def tokens(self, sizes: Sequence[int]) -> float:
        """Expected tokens of rounds with these tree sizes (a node never seen counts as never
        accepted: a size no round has reached yet is valued at what is known below it)."""
        rate = np.divide(self.hits, self.seen, out=np.zeros_like(self.seen), where=self.seen > 0)
        rate[0] = 1.0  # the bonus token: a round of s nodes yields by_size[s] = 1 + rates of nodes 1..s-1
        by_size = np.concatenate(([0.0], np.cumsum(rate)))
        return float(by_size[np.asarray(sizes, dtype=int)].sum())


class BudgetController:
    EMA = 0.5  # weight of a new epoch in a level's rate
    MARGIN = 1.03  # a larger tree must beat the next smaller one by 3%
    MIN_STEPS = 4
    MIN_ROWS = 8
    START_NODES = 8
    SETTLE_STEPS = 1
    MAX_WAIT = 32
    EXPLORE = 0.02  # the most throughput re-checking a losing neighbour may cost
    PROBE_EPOCHS = 2  # epochs a probe runs at the probed level

    def __init__(self, max_nodes: int, adaptive: bool = True) -> None:
        self.max_nodes = max(1, int(max_nodes))
        self.adaptive = adaptive
        self.speculative: dict[str, bool] = {}
        self.caps: dict[str, int] = {}
        self.loads: dict[int, _Load] = {}
        self.acceptance = NodeAcceptance(self.max_nodes)
        self._epoch = _Epoch()
        self._settle = 0

    # ---- sessions ------------------------------------------------------------------------
    def add(self, sid: str, speculative: bool, cap: int = 0) -> None:
        """`cap`: the most nodes the session's device drafts (0: the server's max)."""
        key = self._key()
        self.speculative[sid] = speculative
        if speculative:
            self.caps[sid] = min(cap or self.max_nodes, self.max_nodes)
        self._restart_epoch(key)

    def remove(self, sid: str) -> None:
        key = self._key()
        self.caps.pop(sid, None)
        if self.speculative.pop(sid, None) is not None:
            self._restart_epoch(key)

    def _restart_epoch(self, old_key: int) -> None:
        """A new load: the running epoch measured the old one."""
        if self._key() != old_key:
            self._epoch = _Epoch()
            self._settle = self.SETTLE_STEPS

    # ---- budgets -------------------------------------------------------------------------
    @property
    def cap(self) -> int:
        return max(self.caps.values(), default=self.max_nodes)

    @property
    def levels(self) -> list[int]:
        cap = self.cap
        return sorted({1 << i for i in range(cap.bit_length())} | {cap})

    @property
    def level(self) -> int:
        """The tree budget every speculative session gets for its next round."""
        return self._load().level if self.adaptive else self.cap

    def _key(self) -> int:
        n = max(1, len(self.speculative))
        return 1 << (n - 1).bit_length()

    def _load(self) -> _Load:
        key = self._key()
        load = self.loads.get(key)
        if load is None:
            known = [k for k in self.loads if k < key]
            start = self.loads[max(known)].level * max(known) / key if known else self.START_NODES / key
            load = self.loads[key] = _Load(level=self._snap(start))
        if load.level not in self.levels:  # devices with another cap than when it was learned
            load.level, load.probing_from, load.schedule, load.trial = self._snap(load.level), None, [], {}
        return load

    def _snap(self, budget: float) -> int:
        return max([lv for lv in self.levels if lv <= budget] or [1])

    def _neighbour(self, level: int, direction: int) -> int | None:
        levels = self.levels
        i = levels.index(level) + direction
        return levels[i] if 0 <= i < len(levels) else None

    # ---- measurements --------------------------------------------------------------------
    def observe_step(self, rounds: Sequence[tuple[int, Sequence[int]]], seconds: float, compute: float,
                     prefill: bool) -> None:
        """One scheduler step: each decoding row's (tree size, accepted path), the seconds
        since the previous step ended (wait + compute) and the model's seconds in it."""
        if not self.adaptive or not any(self.speculative.values()) or prefill:
            return
        for size, path in rounds:
            if size > 1:
                self.acceptance.add(size, path)
        if self._settle > 0:
            self._settle -= 1
            return
        e = self._epoch
        sizes = [size for size, _ in rounds]
        e.add(_Epoch(1, seconds, sizes, [(len(sizes), sum(sizes), compute)]))
        if e.steps >= self.MIN_STEPS and len(e.sizes) >= self.MIN_ROWS and e.seconds > 0:
            self._epoch = _Epoch()
            self._end_epoch(e)

    def node_prices(self) -> list[float]:
        """Verdict.node_prices at the current load, one per pair of levels up to the current
        one: entry k prices the nodes that make a tree of 2^k + 1 to 2^(k+1) nodes (the pair
        (2^k, 2^(k+1)), or up to the cap), as a chance of acceptance: the model seconds a token
        adds to a step of that size x the tokens/s at the current level (see the module
        docstring); [] (every node pays) until a probe has measured a cost, and without
        adaptation."""
        return self._prices(self._load()) if self.adaptive else []

    def _prices(self, load: _Load) -> list[float]:
        level, levels = load.level if load.probing_from is None else load.probing_from, self.levels
        rate = load.rates.get(level)
        if level not in levels or rate is None:  # devices with another cap since: nothing applies
            return []
        pairs = list(zip(levels, levels[1:]))  # pair k prices the sizes of shared.tree.price_index k
        measured = [(i, load.token_s[pair]) for i, pair in enumerate(pairs) if pair in load.token_s]
        if not measured:
            return []
        prices: list[float] = []
        for i, (small, large) in enumerate(pairs):
            if small >= level:
                break
            cost = load.token_s.get((small, large))
            if cost is None:  # what the smaller steps of the nearest larger probe cost a token
                cost = next((load.token_s_below[b] for b in sorted(load.token_s_below) if b >= large), None)
            if cost is None:  # the nearest measured pair, a larger one first: a token's cost grows
                # with the step's tokens, so the guess errs towards smaller trees
                cost = min(measured, key=lambda m: (m[0] < i, abs(m[0] - i)))[1]
            prices.append(min(1.0, cost * rate))
        return prices

    def _averaged(self, old: float | None, new: float) -> float:
        """A measurement that drifts with the machine and the text: recent epochs or probes
        weigh most."""
        return new if old is None else old + self.EMA * (new - old)

    def _rate(self, epoch: _Epoch) -> float:
        return self.acceptance.tokens(epoch.sizes) / epoch.seconds if epoch.seconds > 0 else 0.0

    def _switch(self, load: _Load, level: int) -> None:
        load.level = level
        self._settle = self.SETTLE_STEPS

    def _end_epoch(self, epoch: _Epoch) -> None:
        load = self._load()
        if load.probing_from is not None:
            load.trial.setdefault(load.level, _Epoch()).add(epoch)
            if load.schedule:
                self._switch(load, load.schedule.pop(0))
            else:
                self._judge_probe(load)
            return
        old, rate = load.rates.get(load.level), self._rate(epoch)
        load.rates[load.level] = self._averaged(old, rate)
        load.epochs += 1
        if self._step_down(load):
            return
        nxt = self._due_probe(load)
        if nxt is None:
            return
        load.probing_from, load.schedule = load.level, [load.level, nxt]
        load.trial = {load.level: epoch}  # this epoch is the pair's first base epoch
        self._switch(load, nxt)

    @staticmethod
    def _token_cost(costs: Sequence[tuple[int, int, float]]) -> float | None:
        """Model seconds per token: the slope of the steps' seconds over their tokens. A slope,
        not the two levels' difference in means: lock-step rows that miss a step (their device
        answered late) make steps of the larger level fewer-rowed as well as wider, and a
        difference in means charged the missing rows to the extra tokens (26 ms a token at 8
        lock-step clients on this CPU, whose steps with 2 and 4 nodes a row cost 3-4 ms a token
        more than decoding steps). None when the tokens barely vary."""
        if len(costs) < 2:
            return None
        _, tokens, seconds = np.array(costs, dtype=float).T
        if tokens.std() < 0.5:
            return None
        return max(0.0, float(np.polyfit(tokens, seconds, 1)[0]))

    def _probe_costs(self, load: _Load, small: int, large: int) -> None:
        """What a token cost in the probe's steps: between the two levels, the slope over the
        steps with at least `small` tokens a row (over all of them when those barely vary: trees
        the price did not cut); below, over those with at most `small`, which prices the nodes
        of smaller trees until their own pair is probed (a step's cost per token is not linear:
        in bf16 one session's tokens 2-4 cost ~1 ms, 5-16 ~2.4 ms on this CPU), at most at the
        slope between the levels."""
        costs = load.trial[small].costs + load.trial[large].costs
        above = [c for c in costs if c[1] >= small * c[0]]
        below = [c for c in costs if c[1] <= small * c[0]]
        between = self._token_cost(above)
        between = self._token_cost(costs) if between is None else between
        cheaper = self._token_cost(below)
        if cheaper is not None and between is not None:  # only ever a discount: a slope over a few
            cheaper = min(cheaper, between)  # tokens is noisy, and a price too high empties trees
        for table, key, cost in ((load.token_s, (small, large), between), (load.token_s_below, small, cheaper)):
            if cost is not None:  # an average over probes, as the rates: one probe's slope varies by 2x
                table[key] = self._averaged(table.get(key), cost)

    def _gain(self, load: _Load, small: int, large: int) -> float | None:
        """Tokens/s at `large` over `small`: their last probe's rounds and seconds, valued at the
        latest acceptance."""
        probed = load.probed.get((small, large))
        if probed is None:
            return None
        return self._rate(probed[1]) / max(self._rate(probed[0]), 1e-9)

    def _step_down(self, load: _Load) -> bool:
        small = self._neighbour(load.level, -1)
        gain = self._gain(load, small, load.level) if small is not None else None
        if gain is None or gain > self.MARGIN:
            return False
        log.debug("load %d: %d no longer beats %d (x%.2f): stepping down", self._key(), load.level, small, gain)
        self._wait(load, small, load.level, max(0.0, 1.0 - gain),
                   self._slower(*load.probed[(small, load.level)]))
        self._switch(load, small)
        return True

    def _due_probe(self, load: _Load) -> int | None:
        """The neighbour to probe now, the preferred direction first, or None."""
        for direction in (load.direction, -load.direction):
            nxt = self._neighbour(load.level, direction)
            if nxt is not None and load.due.get((load.level, nxt), 0) <= load.epochs:
                load.direction = direction
                return nxt
        return None

    def _judge_probe(self, load: _Load) -> None:
        """Probe and base over the probe's epochs; the run ends on the probe level."""
        base, probe = load.probing_from, load.level
        small, large = sorted((base, probe))
        self._probe_costs(load, small, large)
        trial, load.probing_from, load.trial = load.trial, None, {}
        rates = {lv: self._rate(e) for lv, e in trial.items()}  # valued now, by the same acceptance
        load.rates.update(rates)
        load.probed[(small, large)] = (trial[small], trial[large])
        winner = large if self._gain(load, small, large) > self.MARGIN else small
        loser = small if winner == large else large
        log.debug("load %d: probe %d vs %d: %.1f vs %.1f tokens/s (%s) -> %d", self._key(), probe, base,
                  rates[probe], rates[base],
                  ", ".join(f"{lv}: {len(e.sizes)} rounds in {e.seconds:.2f} s" for lv, e in trial.items()), winner)
        self._wait(load, winner, loser, max(0.0, 1.0 - rates[loser] / max(rates[winner], 1e-9)),
                   self._slower(trial[winner], trial[loser]))
        if winner == probe:  # keep going this way
            load.due.pop((base, probe), None)
            load.waits.pop((base, probe), None)
            return
        self._switch(load, base)
        load.direction = -load.direction

    @staticmethod
    def _slower(winner: _Epoch, loser: _Epoch) -> float:
        """How much longer the loser's steps took than the winner's (at least 1: a probe is never
        counted cheaper than its epochs at the winner's pace)."""
        if not (winner.steps and loser.steps and winner.seconds > 0):
            return 1.0
        return max(1.0, (loser.seconds / loser.steps) / (winner.seconds / winner.steps))

    def _wait(self, load: _Load, level: int, neighbour: int, loss: float, slower: float) -> None:
        """How long `level` leaves `neighbour`, which just lost to it by `loss` with steps
        `slower` times as long, unprobed."""
        pair = (level, neighbour)
        wait = max(2 * load.waits.get(pair, 1), math.ceil(self.PROBE_EPOCHS * loss * slower / self.EXPLORE))
        load.waits[pair] = min(wait, self.MAX_WAIT)
        load.due[pair] = load.epochs + load.waits[pair]

    def as_dict(self) -> dict:
        tokens_per_round = {str(lv): round(self.acceptance.tokens([lv]), 3) for lv in self.levels}
        return dict(level=self.level, adaptive=self.adaptive, tokens_per_round=tokens_per_round,
                    node_prices=[round(p, 3) for p in self.node_prices()], loads={
            str(k): dict(level=v.level, rates={str(lv): round(r, 2) for lv, r in sorted(v.rates.items())},
                         token_ms={f"{a}-{b}": round(c * 1e3, 2) for (a, b), c in sorted(v.token_s.items())},
                         node_prices=[round(p, 3) for p in self._prices(v)] if self.adaptive else [],
                         probing=v.probing_from is not None,
                         next_probe_in={str(n): max(0, due - v.epochs) for (lv, n), due in v.due.items()
                                        if lv == v.level})
            for k, v in sorted(self.loads.items())})


@dataclass
class DeviceLink:
    """Whether a tree round pays for this device: its link (lock-step) and its drafts' yield at
    the server's node prices.

    The load level says whether trees pay for the server's steps on average; this says whether
    they pay for one device. Two ways a device's trees lose:
    - Its link (lock-step only): a tree round takes the device's answer (link round trip plus
      drafting) and a step, and yields `tokens` (accepted + bonus); decoding alone yields one
      token a step. Measured on this CPU (one device, ~65 ms a step, τ 2.0): trees win on the
      LAN, 5g and 4g (1.7 / 1.5 / 1.0-1.2x) and lose from 3g on (0.64x; 0.25x over a 600 ms
      satellite link), where tokens x step < answer + step.
    - Its drafts: a round's extra tokens (tokens - 1) must pay for its nodes at the load's
      prices (Verdict.node_prices: the chance of acceptance at which a node pays for the step
      time it adds). The calibrated heads stop at the price by their calibrated chances, which
      fit some texts better than others (the benchmark's prompts accepted a 2-node tree's node
      in 5-85% of rounds), and n-gram lookups cannot price their nodes at all (7-15% on those
      prompts), so the server judges what the trees yield.
    A device whose trees lose decodes alone and tries trees again after `wait` rounds (the
    link or the text may have changed), a wait that doubles while trees keep losing; a retry
    lasts until a tree round is verified (a pipelined draft may miss a step or two), and its
    answer time replaces the old one, so a link that got fast has its trees back at once."""

    EMA = 0.5  # answer times: a link changes
    # tokens per tree round: one round's count is geometric-like (1-5 at τ 2), so the session's
    # mean over its last WINDOW tree rounds, started from a prior of PRIOR_TOKENS over PRIOR_ROUNDS
    # rounds (what the shipped heads get on a LAN), so that two unlucky rounds do not stop a fast
    # device's trees
    PRIOR_TOKENS, PRIOR_ROUNDS = 2.0, 2
    WINDOW = 32
    FIRST_WAIT = 8
    MAX_WAIT = 128

    rounds: int = 0  # tree rounds seen; the first is not measured (it may carry the drafter's warm-up)
    answer_s: float = 0.0  # EMA of the device's answer time in lock-step tree rounds
    recent: deque = field(default_factory=lambda: deque(maxlen=DeviceLink.WINDOW))  # (size, tokens)
    alone: int = 0  # rounds decoded alone since the last tree round
    wait: int = FIRST_WAIT
    retrying: bool = False  # trees are being tried again after rounds alone

    @property
    def tokens(self) -> float:
        """Expected tokens of a tree round."""
        return (sum(t for _, t in self.recent) + self.PRIOR_TOKENS * self.PRIOR_ROUNDS) / (
            len(self.recent) + self.PRIOR_ROUNDS)

    def tree_round(self, answer_s: float | None, size: int, tokens: int) -> None:
        """A verified round whose tree had `size` nodes; `answer_s` the device's answer time in
        lock-step, None for a pipelined step (it never waits for the device)."""
        self.rounds += 1
        if self.rounds > 1:
            if answer_s is not None:
                weight = 1.0 if self.rounds == 2 or self.retrying else self.EMA  # a retry replaces a stale time
                self.answer_s += weight * (answer_s - self.answer_s)
            self.recent.append((size, tokens))
        self.retrying = False

    def next_round_has_tree(self, step_s: float, prices: Sequence[float] = ()) -> bool:
        """Decides the next round (call once per verdict that would ask for a tree); `prices`
        the node prices that verdict would carry."""
        if self.retrying:
            return True
        if self.rounds < 2 or self._pays(step_s, prices):
            self.alone, self.wait = 0, self.FIRST_WAIT
            return True
        self.alone += 1
        if self.alone < self.wait:
            return False
        self.alone, self.wait, self.retrying = 0, min(2 * self.wait, self.MAX_WAIT), True
        return True

    def _pays(self, step_s: float, prices: Sequence[float]) -> bool:
        tokens = self.tokens
        if tokens * step_s < self.answer_s + step_s:
            return False
        cost = sum(nodes_price(prices, size) for size, _ in self.recent) / (len(self.recent) + self.PRIOR_ROUNDS)
        return tokens - 1.0 >= cost
