"""Export draft heads to ONNX (fp32) and quantize them (int8), with parity checks.

Graph: inputs `hidden` float32 [B, hidden_size] (the device casts the fp16 wire payload up),
for root-conditioned heads `root` int64 [B] (the round's root token), and `heads` int64 [1]
(how many of the K heads to compute, 1..K: a small tree needs only the first); outputs `ids`
int64 [B, heads, top_k] and `logprobs` float32 [B, heads, top_k] (log-softmax over the full
vocabulary, sorted descending). Every projection is a plain 2-D MatMul against a constant, so ONNX
Runtime's quantizers see them. The root embedding is a Gather (axis 1) on the same [r, V]
constant that the vocabulary MatMul uses, so U is stored once; after int8 quantization the
Gather reads the quantized U and dequantizes only the gathered columns (see
_gather_from_quantized), so the graph keeps no fp32 copy of U.

Quantization schemes (pick by measured tau, see train_heads.py):
  int8-per-channel   dynamic int8, per-output-channel weight scales (default)
  int8-per-tensor    dynamic int8, one scale per weight (the naive scheme)
  int8-u-fp16        per-channel int8 everywhere except U, stored fp16 (cast up at run time)
  (these three store their int8 weights as uint8 + 128: see unsigned_weights)
  avx512-vnni / arm64  optimum's ORTQuantizer configs (dynamic, per-channel)

Usage: python scripts/export_heads.py CHECKPOINT.pt OUT_DIR [--scheme ...] [--top-k 10]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads_model import DraftHeads, build_heads, unit_rms  # noqa: E402

SCHEMES = ("int8-per-channel", "int8-per-tensor", "int8-u-fp16", "avx512-vnni", "arm64")


class ExportGraph(nn.Module):
    """The same function as TopKHeads, written with 2-D MatMuls and one Gather (quantizer-friendly)."""

    def __init__(self, heads: DraftHeads, top_k: int) -> None:
        super().__init__()
        self.heads = heads
        self.top_k = top_k

    def forward(self, hidden: torch.Tensor, root: torch.Tensor | None = None, heads: torch.Tensor | None = None):
        """`heads` (int64 [1], optional): project only the first that many heads onto the
        vocabulary. A b-node tree is at most b - 1 deep, so a small budget needs only the first
        heads, and the vocabulary projection, the dense rows, the softmax and the top-k (~95% of
        a call) scale with the heads computed: a 2-node round needs one of the four."""
        hd = self.heads
        h = hidden.to(torch.float32)
        B, K, d = h.shape[0], hd.num_heads, hd.hidden_size
        first = (lambda t: t) if heads is None else (lambda t: t.index_select(1, torch.arange(heads[0])))
        # U^T [r, V] (or E^T): the one constant that the vocabulary MatMul and the root Gather share
        table_t = hd.root_table.t() if hd.root_conditioned or hd.rank else None
        if hd.root_conditioned:
            e = unit_rms(table_t.index_select(1, root).t())  # [B, r]
            c = F.linear(e, hd.C.reshape(K * d, -1)).reshape(B, K, d)  # all C_k in one MatMul
            feats = [hd.blocks[k](h + c[:, k]) for k in range(K)]
        else:
            feats = [hd.blocks[k](h) for k in range(K)]
        if hd.rank:
            z = torch.stack(feats, dim=1)  # [B, K, d]
            low = torch.stack([F.linear(f, hd.A[k]) for k, f in enumerate(feats)], dim=1)  # [B, K, r]
            late = hd.dense_tokens and not hd.dense_shared  # add_dense runs a D per head on every head
            if not late:
                low, z = first(low), first(z)
            # one MatMul against U for all heads, so U is stored (and quantized) once
            x = (low.reshape(-1, hd.rank) @ table_t).reshape(B, -1, hd.vocab_size)
            if hd.dense_tokens:
                x = hd.add_dense(x, z)
            if late:
                x = first(x)
        else:
            x = first(torch.stack([F.linear(z, hd.W[k]) for k, z in enumerate(feats)], dim=1))
        logp = torch.log_softmax(x, dim=-1)
        vals, ids = torch.topk(logp, self.top_k, dim=-1)
        return ids, vals


def export_onnx(heads: DraftHeads, top_k: int, path: Path) -> Path:
    """fp32 ONNX graph; root-conditioned heads get the input `root`, every graph `heads`."""
    heads = heads.eval().float()
    graph = ExportGraph(heads, top_k)
    args: tuple = (torch.zeros(1, heads.hidden_size),)
    names = ["hidden"]
    if heads.root_conditioned:
        args += (torch.zeros(1, dtype=torch.int64),)
        names.append("root")
    args += ({"heads": torch.tensor([heads.num_heads])},)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            graph, args, str(path), input_names=[*names, "heads"], output_names=["ids", "logprobs"],
            dynamic_axes={**{n: {0: "batch"} for n in names}, "ids": {0: "batch", 1: "heads"},
                          "logprobs": {0: "batch", 1: "heads"}},
            opset_version=17, dynamo=False,
        )
    return path


def _u_initializer_name(model) -> str | None:
    """The largest initializer whose first dim is the rank (U^T as [r, V] in the MatMul)."""
    best = None
    for init in model.graph.initializer:
        if len(init.dims) == 2 and (best is None or init.dims[0] * init.dims[1] > best[1]):
            best = (init.name, init.dims[0] * init.dims[1])
    return best[0] if best else None


def _gather_from_quantized(model) -> None:
    """Point Gathers on a quantized constant at its int8 copy, in place.

    ORT's dynamic quantizer quantizes a MatMul's constant (U^T [r, V]) but keeps the fp32
    original for any other consumer, here the root-embedding Gather, which would ship U twice
    (+4 bytes per entry). Instead the Gather reads the int8 columns and dequantizes only
    those, with the same scale/zero point as the MatMul, so the root embedding is exactly the
    U that the vocabulary projection uses. Per-channel scales must run along the gathered
    axis (ORT quantizes a MatMul's B per output column, i.e. per vocabulary entry: they do).
    """
    from onnx import TensorProto, helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        data = node.input[0] if node.op_type == "Gather" else None
        if data not in inits or data + "_quantized" not in inits:
            new_nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        n_axis = inits[data].dims[axis]
        idx, out = node.input[1], node.output[0]
        tag = node.name or out

        def per_index(name: str) -> str:
            """The scale / zero point for the gathered entries: gathered if per channel."""
            size = int(np.prod(inits[name].dims)) if inits[name].dims else 1
            if size == 1:
                return name
            if size != n_axis:
                raise ValueError(f"{name}: per-channel quantization along another axis than the Gather's")
            new_nodes.append(helper.make_node("Gather", [name, idx], [f"{tag}_{name}_g"], axis=0))
            return f"{tag}_{name}_g"

        scale, zp = per_index(data + "_scale"), per_index(data + "_zero_point")
        new_nodes += [
            helper.make_node("Gather", [data + "_quantized", idx], [f"{tag}_q"], axis=axis),
            helper.make_node("Cast", [f"{tag}_q"], [f"{tag}_qf"], to=TensorProto.FLOAT),
            helper.make_node("Cast", [zp], [f"{tag}_zpf"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{tag}_qf", f"{tag}_zpf"], [f"{tag}_c"]),
            helper.make_node("Mul", [f"{tag}_c", scale], [out]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)


def _quantize_dynamic_int8(fp32_path: Path, out_path: Path, per_channel: bool, exclude: list[str] | None = None) -> None:
    """ORT dynamic int8 of every constant MatMul/Gemm weight, then _gather_from_quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel,
        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude or [],
        extra_options={"MatMulConstBOnly": True},
    )
    model = onnx.load(str(out_path))
    _gather_from_quantized(model)
    unsigned_weights(model)
    onnx.save(model, str(out_path))


def unsigned_weights(model) -> None:
    """Store int8 weights as uint8 with the zero point moved by 128, in place: the same numbers,
    so the same graph on every CPU.

    ORT multiplies dynamically quantized uint8 activations by int8 weights with 16-bit partial
    sums on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI), which saturate: on such a CPU a
    576-deep MatMulInteger of full-range random inputs was off by up to 12% in every output,
    and the shipped heads' head-1 log-prob by up to 0.85 on real hidden states, while VNNI
    CPUs (where the heads were trained and measured) compute it exactly. uint8 x uint8 has no
    such path: exact on both, 0.95 -> 1.12 ms a call for the shipped heads on the AVX2 CPU."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for name, init in inits.items():
        zp = name[: -len("_quantized")] + "_zero_point"
        if not name.endswith("_quantized") or init.data_type != TensorProto.INT8 or zp not in inits:
            continue
        for key in (name, zp):
            arr = numpy_helper.to_array(inits[key]).astype(np.int16) + 128
            inits[key].CopyFrom(numpy_helper.from_array(arr.astype(np.uint8), key))


def quantize(fp32_path: Path, out_path: Path, scheme: str = "int8-per-channel") -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if scheme in ("int8-per-channel", "int8-per-tensor"):
        _quantize_dynamic_int8(fp32_path, out_path, per_channel=scheme == "int8-per-channel")
        return out_path
    if scheme == "int8-u-fp16":
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(fp32_path))
        uname = _u_initializer_name(model)
        excl = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and uname in n.input]
        tmp = out_path.with_suffix(".tmp.onnx")
        _quantize_dynamic_int8(fp32_path, tmp, per_channel=True, exclude=excl)
        model = onnx.load(str(tmp))
        for i, init in enumerate(model.graph.initializer):
            if init.name == uname:
                arr = numpy_helper.to_array(init).astype(np.float16)
                half = numpy_helper.from_array(arr, uname + "_fp16")
                model.graph.initializer.remove(init)
                model.graph.initializer.append(half)
                model.graph.node.insert(0, helper.make_node("Cast", [uname + "_fp16"], [uname], to=onnx.TensorProto.FLOAT))
                break
        onnx.save(model, str(out_path))
        tmp.unlink()
        return out_path
    if scheme in ("avx512-vnni", "arm64"):
        import onnx
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        cfg = (AutoQuantizationConfig.avx512_vnni if scheme == "avx512-vnni" else AutoQuantizationConfig.arm64)(
            is_static=False, per_channel=True
        )
        work = out_path.parent / f".{scheme}"
        work.mkdir(exist_ok=True)
        shutil.copy(fp32_path, work / "model.onnx")
        q = ORTQuantizer.from_pretrained(work, file_name="model.onnx")
        q.quantize(save_dir=work, quantization_config=cfg)
        model = onnx.load(str(work / "model_quantized.onnx"))
        _gather_from_quantized(model)
        onnx.save(model, str(out_path))
        shutil.rmtree(work, ignore_errors=True)
        return out_path
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(sess, hidden: np.ndarray, root: np.ndarray, heads: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Batched graph outputs of the first `heads` heads; `root` (the token after each hidden
    state's position) and `heads` are fed only to graphs that take them, so older graphs run
    on the same data."""
    inputs = {i.name for i in sess.get_inputs()}
    ids, lps = [], []
    for i in range(0, len(hidden), batch):
        feeds = {"hidden": np.ascontiguousarray(hidden[i:i + batch], dtype=np.float32)}
        if "heads" in inputs:
            feeds["heads"] = np.array([heads], dtype=np.int64)
        if "root" in inputs:
            feeds["root"] = np.ascontiguousarray(root[i:i + batch], dtype=np.int64)
        a, b = sess.run(None, feeds)
        ids.append(a)
        lps.append(b)
    return np.concatenate(ids), np.concatenate(lps)


def parity(heads: DraftHeads, onnx_path: Path, hidden: np.ndarray, root: np.ndarray, top_k: int) -> dict:
    """Top-1 agreement and max |log-prob| gap of an ONNX graph against the torch heads."""
    with torch.no_grad():
        ref_ids, ref_lp = ExportGraph(heads.eval().float(), top_k)(
            torch.from_numpy(hidden.astype(np.float32)), torch.from_numpy(root.astype(np.int64)))
    ids, lp = run_onnx(ort_session(onnx_path), hidden, root, heads.num_heads)
    ref_ids, ref_lp = ref_ids.numpy(), ref_lp.numpy()
    return {
        "top1_agreement": float((ids[..., 0] == ref_ids[..., 0]).mean()),
        "top1_agreement_per_head": (ids[..., 0] == ref_ids[..., 0]).mean(0).tolist(),
        "max_abs_logprob_diff_top1": float(np.abs(lp[..., 0] - ref_lp[..., 0]).max()),
    }


def load_checkpoint(path: Path) -> DraftHeads:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    heads = build_heads(ck["config"])
    heads.load_state_dict(ck["heads"])
    return heads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--scheme", default="int8-per-channel", choices=SCHEMES)
    args = ap.parse_args(argv)
    heads = load_checkpoint(args.checkpoint)
    fp32 = export_onnx(heads, args.top_k, args.out_dir / "heads.fp32.onnx")
    q = quantize(fp32, args.out_dir / "heads.int8.onnx", args.scheme)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((64, heads.hidden_size)).astype(np.float32)
    root = rng.integers(0, heads.vocab_size, size=64)
    print("fp32", parity(heads, fp32, h, root, args.top_k))
    print("int8", parity(heads, q, h, root, args.top_k), q.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
