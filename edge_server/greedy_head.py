"""The greedy token after a hidden state without the LM head's whole fp32 product.

A greedy row needs one number from the LM head: the index of its largest logit. On a CPU the
fp32 product over the vocabulary (49,152 x 576 for SmolLM2) costs 9-20 ms for 1-16 rows, most
of it streaming the weight. ScreenedArgmax multiplies an int8 copy instead (onnxruntime's
MatMulInteger on MLAS) to get every logit approximately, with a bound on each approximation's
error that holds for any input, and then computes in fp32 only the logits of the tokens whose
bound reaches the best lower bound. On the embedded model's hidden states a row keeps a median
of 2 such candidates (99th percentile 31, at most 73, over 1,735 positions of generated text).

Why the result is the fp32 argmax. For token j let L_j be the exact logit, M_j any fp32
evaluation of it (|M_j - L_j| <= gamma_d |W_j| |x|, whatever the summation order), and A_j
the approximation with |A_j - M_j| <= B_j. A token outside the candidates has
A_j + B_j < A_k - B_k for some k, so its M_j is below a candidate's whichever fp32 evaluation
is used, and the first candidate with the largest recomputed logit is the argmax (first index
on ties, as torch's) of one fp32 evaluation of all logits: the standing of the full product,
which is also one of the possible fp32 evaluations.

The bound. Weights are quantized per vocabulary row to 8 bits (W = What + E), a hidden state
per row (x = xhat + d). SmolLM2's final hidden state has outlier channels (up to ~19 where most
are ~1) that would set a coarse activation step: with them, a row kept a median of 40
candidates and a 99th percentile of 45,791 (the whole vocabulary). So the 32 largest channels
(found once, from a forward at load) are multiplied in fp32 and the int8 product covers the
rest. Then L_j - A_j = E_j . x_rest + What_j . d (+ rounding), bounded by Cauchy-Schwarz with
norms kept from load. Unsigned codes (zero point 128) keep MLAS's AVX2 kernel exact: its
signed-weight kernel can saturate 16-bit pair sums; the sums stay below 2**24, so they are
exact in float32 too.
"""
from __future__ import annotations

import numpy as np
import torch

from edge_server.onnx_products import one_thread_session

ZERO = 128  # zero point of the unsigned codes: code = value / scale + 128
SAFETY = 1.0 + 1e-6  # slack over the rounding of the bound's own arithmetic (a few units)
UNIT = 2.0 ** -24  # fp32 unit roundoff


class ScreenedArgmax:
    """argmax(x @ W.T) for fp32 rows x, exact (see the module's docstring). `exact_channels`:
    the hidden state's outlier channels, multiplied in fp32 and left out of the int8 product.
    One thread: the session runs on the caller's thread, the model's."""

    def __init__(self, weight: torch.Tensor, exact_channels: torch.Tensor):
        self.weight = weight.detach()
        self.vocab, dim = self.weight.shape
        self.exact = exact_channels.sort().values
        self.rest = torch.from_numpy(np.setdiff1d(np.arange(dim), self.exact.numpy()))
        codes = torch.empty(len(self.rest), self.vocab, dtype=torch.uint8)  # MatMulInteger's B
        self.scale = torch.empty(self.vocab)
        self.coeffs = torch.empty(3, self.vocab)  # see bound
        gamma = dim * UNIT / (1 - dim * UNIT)
        for rows in torch.arange(self.vocab).split(4096):  # float64 a block at a time
            w = self.weight[rows].to(torch.float64)
            scale = _float32_steps(w[:, self.rest].abs().amax(dim=1) / 127)
            q = torch.round(w[:, self.rest] / scale[:, None]).clamp_(-127, 127)
            dequantized = q * scale[:, None]
            codes[:, rows] = (q + ZERO).to(torch.uint8).t()
            self.scale[rows] = scale.float()
            # B_j = |x_rest| |E_j| + |d| |What_j| + |x| 2 gamma |W_j|: the int8 part's error, then
            # twice the bound on any fp32 evaluation's, the second half covering this float32
            # arithmetic (a few units of roundoff of |W_j| |x|)
            self.coeffs[:, rows] = torch.stack([(w[:, self.rest] - dequantized).norm(dim=1), dequantized.norm(dim=1),
                                                2 * gamma * w.norm(dim=1)]).float()
        self.scale, self.coeffs = self.scale.numpy(), self.coeffs.numpy()
        self.widest = self.coeffs.max(axis=1)
        self.session = _products(codes.numpy(), self.weight[:, self.exact].t().contiguous().numpy())
        self._last_rows = (torch.zeros(0, dtype=torch.long), 0)  # each candidate's row, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The greedy token for each row of x ([n, d] float32): int64 [n]."""
        approx, norms = self.screen(x)
        top = approx.argmax(axis=1)
        # the best lower bound among the tokens is at least the top approximation's
        lower = approx[np.arange(len(top)), top] - self.bound(top, norms)
        widest = norms @ self.widest * SAFETY
        row, token = np.divmod(np.flatnonzero(approx >= (lower - widest)[:, None]), self.vocab)  # 2-D nonzero is slow
        keep = approx[row, token] + self.bound(token, norms[row]) >= lower[row]
        row, token = torch.from_numpy(row[keep]), torch.from_numpy(token[keep])
        self._last_rows = (row, len(x))
        union, column = torch.unique(token, return_inverse=True)  # ascending: first index wins ties
        exact = torch.full((len(x), len(union)), float("-inf"))
        exact[row, column] = (x[row].float() * self.weight[token]).sum(dim=1)
        return union[exact.argmax(dim=1)]

    def screen(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Every logit's approximation A ([n, V] float32) and the row norms its error bound takes
        ([n, 3], see bound): |A_j - M_j| <= bound(j)."""
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("the target's final hidden state is not finite (NaN or inf): its logits have "
                                     "no argmax; the model's weights or its dtype overflowed")
        x_rest = x[:, self.rest].double()
        step = _float32_steps(x_rest.abs().amax(dim=1) / 127)
        codes = torch.round(x_rest / step[:, None]).clamp_(-127, 127)
        residual = x_rest - codes * step[:, None]
        sums, outliers = self.session.run(None, {"x": (codes + ZERO).to(torch.uint8).numpy(),
                                                 "exact": x[:, self.exact].contiguous().numpy()})
        approx = sums.astype(np.float32)  # exact: |sum| <= d * 127 * 127 < 2**24
        approx *= step.float().numpy()[:, None]
        approx *= self.scale
        approx += outliers
        norms = torch.stack([x_rest.norm(dim=1), residual.norm(dim=1), x.double().norm(dim=1)], dim=1)
        return approx, (norms * SAFETY).float().numpy()

    @property
    def last_candidates(self) -> list[int]:
        """The candidates each row of the last call recomputed (for tests and benchmarks)."""
        rows, n = self._last_rows
        return torch.bincount(rows, minlength=n).tolist()

    def bound(self, token: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """The error bound of each token's approximation, for rows with these norms."""
        return (norms * self.coeffs[:, token].T).sum(axis=1)


def _products(codes_t: np.ndarray, exact_t: np.ndarray):
    """Both products in one onnxruntime call on MLAS: the int8 codes' exact int32 sums and the
    exact channels' fp32 product."""
    from onnx import TensorProto, helper

    (rest, vocab), k = codes_t.shape, len(exact_t)
    return one_thread_session(
        [helper.make_node("MatMulInteger", ["x", "w", "zero", "zero"], ["sums"]),
         helper.make_node("MatMul", ["exact", "w_exact"], ["outliers"])],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["rows", rest]),
         helper.make_tensor_value_info("exact", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("sums", TensorProto.INT32, ["rows", vocab]),
         helper.make_tensor_value_info("outliers", TensorProto.FLOAT, ["rows", vocab])],
        {"w": codes_t, "w_exact": exact_t}, (helper.make_tensor("zero", TensorProto.UINT8, [], [ZERO]),))


def outlier_channels(hidden: torch.Tensor, k: int = 32) -> torch.Tensor:
    """The k channels (at most a quarter) with the largest magnitudes in sample hidden states
    ([n, d]): left out of the int8 product, they no longer set its coarse activation step."""
    return hidden.abs().amax(dim=0).topk(min(k, hidden.shape[1] // 4)).indices


def _float32_steps(steps: torch.Tensor) -> torch.Tensor:
    """Quantization steps as float32 values (held in float64), so the float32 arithmetic of the
    approximation multiplies by exactly the steps the bound assumes; 1 for all-zero rows."""
    steps = steps.float().double()
    return torch.where(steps > 0, steps, torch.ones_like(steps))
