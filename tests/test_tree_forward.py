"""One tree forward gives every node the logits its own path gets when run sequentially."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_server.verifier import TargetModel, fit_cpu_products
from shared.tree import TokenTree


def test_tree_logits_match_sequential_paths(loaded):
    target = TargetModel(loaded.model, max_context=8192)
    prompt = loaded.tokenizer("The quick brown fox jumps over the", return_tensors="pt").input_ids[0].tolist()
    # a bushy tree with repeated tokens on different branches
    tree = TokenTree((264, 9048, 3446, 30, 9048, 260, 264, 1420),
                     (-1, 0, 0, 1, 2, 3, 3, 6))
    cache = target.new_cache()
    target.prefill(cache, prompt)
    out = target.forward_tree(cache, len(prompt), tree)
    with torch.inference_mode():
        for node in range(len(tree)):
            seq = prompt + [tree.tokens[i] for i in tree.path_to(node)]
            ref = loaded.model(torch.tensor([seq]), output_hidden_states=True)
            assert torch.allclose(out.logits[node], ref.logits[0, -1], atol=1e-4, rtol=0), node
            assert torch.allclose(out.hidden[node], ref.hidden_states[-1][0, -1], atol=1e-4, rtol=0)


def test_commit_keeps_prefix_and_accepted_path(loaded):
    target = TargetModel(loaded.model, max_context=8192)
    prompt = loaded.tokenizer("Once upon a time", return_tensors="pt").input_ids[0].tolist()
    tree = TokenTree((11, 12, 13, 14), (-1, 0, 0, 2))
    cache = target.new_cache()
    target.prefill(cache, prompt)
    target.forward_tree(cache, len(prompt), tree)
    committed = target.commit(cache, len(prompt), [0, 2, 3])
    assert committed == len(prompt) + 3
    # the cache now equals a causal run over prompt + accepted tokens
    nxt = TokenTree.root_only(15)
    out = target.forward_tree(cache, committed, nxt)
    with torch.inference_mode():
        ref = loaded.model(torch.tensor([prompt + [11, 13, 14, 15]])).logits[0, -1]
    assert torch.allclose(out.logits[0], ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def bf16_target():
    from edge_server.model_store import load_model

    return TargetModel(load_model("default", torch.bfloat16, "cpu").model, max_context=8192)


@pytest.mark.parametrize("context", [0, 183, 502])
def test_bf16_tree_nodes_are_bitwise_the_decoding_steps(loaded, bf16_target, context):
    """In bf16 on CPU a tree node's logits and hidden state are exactly those of one-token
    decoding along its path, batched with other sessions' rows or not (this is what keeps
    bf16 speculation lossless: see edge_server.one_token_attention), and so is another
    session's decoding step in the same step. `context` tokens before the prompt put the tree
    at 190 and 509 committed positions."""
    from edge_server.kv_cache import KVPool, Row

    target = bf16_target
    model = target.model
    pool = KVPool.for_model(model, 64)
    prompt = loaded.tokenizer("The quick brown fox jumps over the", return_tensors="pt").input_ids[0].tolist()
    prompt = [(1000 + 37 * i) % 30000 for i in range(context)] + prompt
    other_prompt = list(range(2000, 2090))
    tree = TokenTree((264, 9048, 3446, 30, 9048, 260, 264, 1420), (-1, 0, 0, 1, 2, 3, 3, 6))

    def prefilled(ids):
        slot = pool.allocate(len(ids) + 16)
        target.forward_rows([Row(slot, 0, ids, list(range(len(ids))), None, [])])
        return slot

    p = len(prompt)
    tree_slot, other, third = prefilled(prompt), prefilled(other_prompt), prefilled(prompt)
    tree_row = Row.for_tree(tree_slot, p, tree)
    other_row = Row(other, len(other_prompt), [7, 8, 9], [90, 91, 92], None, [2])  # a prompt chunk
    step_row = Row(third, p, [tree.tokens[0]], [p], None, [0])  # decoding the tree's root token
    logits, hidden = target.forward_rows([other_row, tree_row, step_row])
    assert torch.equal(hidden[2][0], hidden[1][0]) and torch.equal(logits[2][0], logits[1][0])
    for node in range(len(tree)):
        path = [tree.tokens[i] for i in tree.path_to(node)]
        slot = prefilled(prompt)
        for i, tok in enumerate(path):  # one decoding step per token, alone
            step_logits, step_hidden = target.forward_rows([Row(slot, p + i, [tok], [p + i], None, [0])])
        assert torch.equal(hidden[1][node], step_hidden[0][0]), node
        assert torch.equal(logits[1][node], step_logits[0][0]), node
        pool.free(slot)


def _tiny_mistral(window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                        max_position_embeddings=256, attn_implementation="eager")
    return MistralForCausalLM(cfg).eval()


def test_sliding_window_layers_see_only_their_window():
    """Models with local-attention layers (Mistral-style sliding windows) go through the ragged
    batch's window masks: a prompt in two chunks, then a tree, batched with another session's
    decoding step, must give each node the logits the model itself computes for its path.
    A tiny random model (the embedded one has no sliding-window layers); the prompt is longer
    than the window, so a mask that ignored it would differ."""
    from edge_server.kv_cache import KVPool, Row

    model = _tiny_mistral(window=5)
    target = TargetModel(model, max_context=256)
    pool = KVPool.for_model(model, 4)
    prompt, other = [int(t) for t in torch.randint(0, 97, (14,))], [3, 1, 4, 1, 5, 9]
    tree = TokenTree((11, 12, 13, 14, 15, 16), (-1, 0, 0, 1, 3, 2))
    slot, other_slot = pool.allocate(32), pool.allocate(32)
    target.forward_rows([Row(slot, 0, prompt[:8], list(range(8)), None, []),
                         Row(other_slot, 0, other, list(range(len(other))), None, [])])
    target.forward_rows([Row(slot, 8, prompt[8:], list(range(8, 14)), None, [])])
    p = len(prompt)
    logits, _ = target.forward_rows([Row(other_slot, len(other), [7], [len(other)], None, [0]),
                                     Row.for_tree(slot, p, tree)])
    with torch.inference_mode():
        for node in range(len(tree)):
            seq = prompt + [tree.tokens[i] for i in tree.path_to(node)]
            ref = model(torch.tensor([seq])).logits[0, -1]
            assert torch.allclose(logits[1][node], ref, atol=1e-5, rtol=0), node
        ref_other = model(torch.tensor([other + [7]])).logits[0, -1]
    assert torch.allclose(logits[0][0], ref_other, atol=1e-5, rtol=0)


def test_bf16_tree_nodes_are_bitwise_the_decoding_steps_in_sliding_window_layers():
    """The exact one-token attention covers local-attention layers too: without it their nodes
    went through the fused kernel, and here 3-4 of 8 differed from their decoding steps in bf16
    (with a window of 5, and with one of 1000 that masks nothing)."""
    from edge_server.kv_cache import KVPool, Row

    model = _tiny_mistral(window=5).to(torch.bfloat16)
    target = TargetModel(model, max_context=256)
    pool = KVPool.for_model(model, 4)
    prompt = [int(t) for t in torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))]
    tree = TokenTree((11, 12, 13, 14, 15, 16, 17, 18), (-1, 0, 0, 1, 3, 2, 4, 6))
    p = len(prompt)

    def prefilled():
        slot = pool.allocate(64)
        target.forward_rows([Row(slot, 0, prompt, list(range(p)), None, [])])
        return slot

    _, hidden = target.forward_rows([Row.for_tree(prefilled(), p, tree)])
    for node in range(len(tree)):
        slot = prefilled()
        for i, tok in enumerate(tree.tokens[j] for j in tree.path_to(node)):
            _, step_hidden = target.forward_rows([Row(slot, p + i, [tok], [p + i], None, [0])])
        assert torch.equal(hidden[0][node], step_hidden[0][0]), node
        pool.free(slot)


@pytest.mark.parametrize("dtype, threads", [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 1),
                                           (torch.bfloat16, 2)])
def test_cpu_products_give_each_row_the_same_bits_in_any_batch(dtype, threads):
    """What a batched or tree step relies on: a token's product does not depend on how many
    rows share it or which (fp32 on one thread, MLAS: any; on several, oneDNN: from 2 rows up,
    a single row takes the GEMV; bf16, oneDNN's packed weight where it has bf16 kernels: any).
    And each path computes the layer's own product."""
    torch.manual_seed(0)
    layer = nn.Linear(576, 1536).to(dtype)
    fit_cpu_products(layer, threads)
    x = torch.randn(17, 576, dtype=dtype)
    with torch.inference_mode(), _torch_threads(threads):
        reference = layer(x[None])[0]
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(reference, F.linear(x, layer.weight, layer.bias), atol=tolerance, rtol=tolerance)
        smallest = 2 if dtype == torch.float32 and threads > 1 else 1
        for n in range(smallest, 17):
            for first in (0, 17 - n):
                rows = layer(x[None, first:first + n])[0]
                assert torch.equal(rows, reference[first:first + n]), (n, first)


@contextlib.contextmanager
def _torch_threads(n: int):
    """The products run on as many threads as the server would give them."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Block(nn.Module):
    """The sibling projections of a Llama-style layer, as fit_cpu_products finds them."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(576, n, bias=bias) for n in (576, 192, 192))
        self.gate_proj, self.up_proj = nn.Linear(576, 1536, bias=bias), nn.Linear(576, 1536, bias=bias)


@pytest.mark.parametrize("dtype, threads", [(torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_sibling_projections_share_one_product_bit_for_bit(bias, dtype, threads):
    """On one fp32 thread, and in bf16, q/k/v and gate/up run as one product each
    (edge_server.verifier._SiblingProducts): every member must still give its own product's
    bits, whichever input it is called on and in whatever order, and keep its own weights."""
    torch.manual_seed(0)
    block = _Block(bias).to(dtype)
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    weights = {n: getattr(block, n).weight.detach().clone() for n in names}
    alone = {n: nn.Linear(576, getattr(block, n).out_features, bias=bias).to(dtype) for n in names}
    for n in names:
        alone[n].load_state_dict(getattr(block, n).state_dict())
        fit_cpu_products(alone[n], threads=threads)
    fit_cpu_products(block, threads=threads)
    with torch.inference_mode(), _torch_threads(threads):
        for rows in (1, 2, 5, 16, 64):
            x, other = torch.randn(1, rows, 576, dtype=dtype), torch.randn(1, rows, 576, dtype=dtype)
            for n in names:  # the order a layer calls them in
                assert torch.equal(getattr(block, n)(x), alone[n](x)), (n, rows)
            assert torch.equal(block.k_proj(other), alone["k_proj"](other))  # another input
            assert torch.equal(block.v_proj(x), alone["v_proj"](x))  # and back, out of order
            assert torch.equal(block.q_proj(x), alone["q_proj"](x))
    for n in names:
        assert torch.equal(getattr(block, n).weight, weights[n]), n
