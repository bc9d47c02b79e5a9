"""The lean Llama-family forward (edge_server.llama_rows) is bitwise the model's own forward.

The bf16 lossless references decode through the server's own batched forward (conftest.Served),
so without this check a difference between the lean path and transformers' modules would go
unnoticed in bf16."""
import pytest
import torch

from edge_server.kv_cache import KVPool, Row
from edge_server.model_store import load_model
from edge_server.verifier import TargetModel
from shared.tree import TokenTree

PROMPTS = ([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173], [1, 4093, 198, 504, 314, 2],
           [1, 4093, 198, 23409, 7906, 1053, 30, 17, 42, 11, 5, 6, 7])


def _lean_and_modules_agree(model) -> None:
    """A decoding step, a 4-node tree (greedy rows) and a prompt chunk with logits, batched after
    three prompts: logits, greedy tokens, hidden states and the K/V written, both ways."""
    target = TargetModel(model, max_context=256)
    assert target.llama_rows is not None
    lean = target.llama_rows
    pool = KVPool.for_model(model, 16)
    slots = [pool.allocate(64) for _ in PROMPTS]
    target.forward_rows([Row(s, 0, p, list(range(len(p))), logit_rows=[len(p) - 1])
                         for s, p in zip(slots, PROMPTS)])
    tree = TokenTree((5, 6, 7, 8), (-1, 0, 0, 1))
    pasts = [len(p) for p in PROMPTS]
    rows = lambda: [  # noqa: E731
        Row.for_tree(slots[0], pasts[0], TokenTree.root_only(5), greedy=True),
        Row.for_tree(slots[1], pasts[1], tree, greedy=True),
        Row(slots[2], pasts[2], [11, 12, 13], [pasts[2] + i for i in range(3)], logit_rows=[0, 2])]

    outputs, caches = {}, {}
    for name, path in (("modules", None), ("lean", lean)):
        target.llama_rows = path
        scores, hidden = target.forward_rows(rows())
        outputs[name] = scores + hidden
        caches[name] = [s.storage[:, :, :, :p + n].clone() for s, p, n in zip(slots, pasts, (1, 4, 3))]
    assert all(torch.equal(a, b) for a, b in zip(outputs["modules"], outputs["lean"]))
    assert all(torch.equal(a, b) for a, b in zip(caches["modules"], caches["lean"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_is_bitwise_the_modules(dtype):
    """The embedded model (SmolLM2: grouped-query attention, no biases) takes the lean path."""
    _lean_and_modules_agree(load_model("default", dtype, "cpu").model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_covers_llama_variants(dtype):
    """Other Llamas: biases on the projections, a head size of its own, llama3 rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=24000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True,
                      mlp_bias=True, max_position_embeddings=256,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    _lean_and_modules_agree(LlamaForCausalLM(cfg).eval().to(dtype))


def _tiny(family: str):
    """Tiny random Mistral (a sliding window on every layer) and Qwen2 (q/k/v biases, a window on
    its second layer only); the prompts are longer than the window of 5."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=24000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**shape, sliding_window=5)).eval()
    model = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=1)).eval()
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 5]
    return model


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_covers_mistral_and_qwen2(family, dtype):
    _lean_and_modules_agree(_tiny(family).to(dtype))
