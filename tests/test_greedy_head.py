"""The int8-screened greedy head: its error bound holds on any input, so its token is the fp32
argmax; and on the embedded model it screens down to a few candidates."""
import pytest
import torch

from edge_server.greedy_head import ScreenedArgmax, outlier_channels
from edge_server.verifier import TargetModel
from shared.tree import TokenTree

GAMMA = 2.0 ** -24 * 192 / (1 - 2.0 ** -24 * 192)  # fp32 dot products of 192 terms


def _adversarial(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, hidden states and calibration states that stress every term of the bound."""
    g = torch.Generator().manual_seed(seed)
    vocab, dim = 4096, 192
    w = torch.randn(vocab, dim, generator=g) * 0.05
    w[10:20] *= 40  # rows with a coarse quantization step
    w[21] = 0  # a zero row
    w[22] = 0.05  # every code +127: the kernel's largest unsigned products (255 x 255)
    w[23, ::2], w[23, 1::2] = -0.05, 0.05
    w[100] = w[200] = w[50]  # exact ties: the first index wins
    w[300] = w[50] + 1e-7 * torch.randn(dim, generator=g)  # a near tie
    calibration = torch.randn(64, dim, generator=g)
    calibration[:, :8] *= 30  # outlier channels
    x = torch.randn(24, dim, generator=g)
    x[:, :8] *= 30
    x[1, 100] = 400.0  # an outlier in a channel the calibration did not see
    x[2] = 0.0
    x[3] = 1.0  # every activation code +127
    # token 50 and its copies on top: w[50] without the large rows' directions, projected in
    # float64 through the pseudo-inverse (the rows include the zero row 21, and MKL's float32
    # lstsq of that rank-deficient system varied from run to run: once token 10 came out on top)
    big = w[10:24].double().t()
    x[4] = (50 * (w[50].double() - big @ (torch.linalg.pinv(big) @ w[50].double()))).float()
    x[5] = w[22] * 1e3
    x[6] *= 1e-20
    x[7] = w[23] * 3
    return w, x, calibration


def test_bound_covers_every_logit_and_the_token_is_an_fp32_argmax():
    w, x, calibration = _adversarial()
    head = ScreenedArgmax(w, outlier_channels(calibration))
    assert set(head.exact.tolist()) >= set(range(8))
    # a row along token 60's weight rounding error, whole numbers up to 127 so that its own
    # codes are exact: that error term alone, its Cauchy-Schwarz bound nearly tight
    rest, scale = head.rest, float(head.scale[60])
    error = w[60, rest] - torch.round(w[60, rest] / scale) * scale
    aligned = torch.zeros(1, w.shape[1])
    aligned[0, rest] = torch.round(127 * error / error.abs().max())
    x = torch.cat([x, aligned])
    exact = x.double() @ w.double().t()
    approx, norms = head.screen(x)
    for r in range(len(x)):
        bound = torch.from_numpy(head.bound(torch.arange(len(w)).numpy(), norms[[r] * len(w)]))
        assert ((torch.from_numpy(approx[r]).double() - exact[r]).abs() <= bound.double()).all(), r
    tokens = head(x)
    fp32 = (x @ w.t()).argmax(dim=1)
    fp32_error = GAMMA * w.double().norm(dim=1).max() * x.double().norm(dim=1)
    top2 = exact.topk(2, dim=1).values
    for r, t in enumerate(tokens.tolist()):
        # always one of the tokens some fp32 evaluation could make the largest
        assert exact[r, t] >= top2[r, 0] - 2 * fp32_error[r], r
        if top2[r, 0] - top2[r, 1] > 2 * fp32_error[r]:
            assert t == fp32[r].item(), r
    assert tokens[4].item() == 50  # ties with rows 100 and 200: the first index, as torch's argmax
    assert tokens[2].item() == 0  # all logits 0


def test_a_hidden_state_that_is_not_finite_is_an_error_not_a_token():
    w, x, calibration = _adversarial()
    head = ScreenedArgmax(w, outlier_channels(calibration))
    for bad in (float("nan"), float("inf")):
        x[0, 50] = bad
        with pytest.raises(FloatingPointError, match="not finite"):
            head(x)


def test_several_seeds_agree_with_the_full_fp32_product():
    for seed in range(1, 4):
        w, x, calibration = _adversarial(seed)
        head = ScreenedArgmax(w, outlier_channels(calibration))
        exact = x.double() @ w.double().t()
        top2 = exact.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * top2[:, 0].abs().clamp(min=1e-30)
        assert torch.equal(head(x)[clear], (x @ w.t()).argmax(dim=1)[clear]), seed


def test_embedded_model_greedy_rows_screen_to_few_candidates(loaded):
    target = TargetModel(loaded.model, max_context=8192)
    head = target.screened_head
    assert head is not None, "an fp32 CPU target screens its greedy rows"
    tok, states = loaded.tokenizer, []
    with torch.inference_mode():
        for text in ("Explain how a bicycle works.", "Write a Python function that sorts a list."):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt")
            out = loaded.model.generate(ids, max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(ids))
            states.append(loaded.model.model(out).last_hidden_state[0])
        x = torch.cat(states)
        full = target.lm_head(x).argmax(dim=1)
    assert torch.equal(head(x), full)
    # the screen narrows (a median of 2 candidates, at most 73 in 1,735 rows, measured): a bound that grew
    # loose would still be exact but would recompute most of the vocabulary
    assert max(head.last_candidates) < 1000


def test_one_step_mixes_greedy_sampled_and_logitless_rows(loaded):
    """forward_rows hands each row what it asked for, whatever the other rows are: a greedy
    tree's argmax tokens (as the full logits' argmax), a sampled row's full logits, nothing for
    a prompt chunk that is not the prompt's end."""
    from edge_server.kv_cache import KVPool, Row

    target = TargetModel(loaded.model, max_context=8192)
    pool = KVPool.for_model(loaded.model, 64)
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog because").input_ids
    slots = [pool.allocate(len(ids) + 16) for _ in range(3)]
    for slot in slots:
        target.forward_rows([Row(slot, 0, ids, list(range(len(ids))))])
    tree = TokenTree((264, 9048, 3446, 30), (-1, 0, 0, 1))

    def rows(greedy: bool) -> list[Row]:
        return [Row.for_tree(slots[0], len(ids), tree, greedy=greedy),
                Row(slots[1], len(ids), [7, 8, 9], [len(ids) + i for i in range(3)], None, [], greedy),
                Row.for_tree(slots[2], len(ids), tree, greedy=not greedy)]

    mixed, _ = target.forward_rows(rows(True))
    full, _ = target.forward_rows(rows(False))
    assert mixed[0].dtype == torch.long and torch.equal(mixed[0], full[0].argmax(dim=-1))
    assert mixed[1].numel() == 0 and full[1].shape == (0, target.vocab_size)
    assert mixed[2].is_floating_point() and torch.equal(mixed[2].argmax(dim=-1), full[2])
    for slot in slots:
        pool.free(slot)
