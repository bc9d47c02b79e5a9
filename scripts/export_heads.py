"""Export draft heads to ONNX (fp32) and quantize them (int8), with parity checks.

Graph: input `hidden` float32 [B, hidden_size] (the device casts the fp16 wire payload up);
outputs `ids` int64 [B, K, top_k] and `logprobs` float32 [B, K, top_k] (log-softmax over the
full vocabulary, sorted descending). Every projection is a plain 2-D MatMul against a constant,
so ONNX Runtime's quantizers see them.

Quantization schemes (pick by measured tau, see train_heads.py):
  int8-per-channel   dynamic int8, per-output-channel weight scales (default)
  int8-per-tensor    dynamic int8, one scale per weight (the naive scheme)
  int8-u-fp16        per-channel int8 everywhere except U, stored fp16 (cast up at run time)
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
from heads_model import DraftHeads, build_heads  # noqa: E402

SCHEMES = ("int8-per-channel", "int8-per-tensor", "int8-u-fp16", "avx512-vnni", "arm64")


class ExportGraph(nn.Module):
    """The same function as TopKHeads, written with 2-D MatMuls only (quantizer-friendly)."""

    def __init__(self, heads: DraftHeads, top_k: int) -> None:
        super().__init__()
        self.heads = heads
        self.top_k = top_k

    def forward(self, hidden: torch.Tensor):
        hd = self.heads
        h = hidden.to(torch.float32)
        feats = [hd.blocks[k](h) for k in range(hd.num_heads)]
        if hd.rank:
            # one MatMul against U for all heads, so U is stored (and quantized) once
            low = torch.stack([F.linear(z, hd.A[k]) for k, z in enumerate(feats)], dim=1)  # [B, K, r]
            x = F.linear(low.reshape(-1, hd.rank), hd.U).reshape(h.shape[0], hd.num_heads, hd.vocab_size)
        else:
            x = torch.stack([F.linear(z, hd.W[k]) for k, z in enumerate(feats)], dim=1)
        logp = torch.log_softmax(x, dim=-1)
        vals, ids = torch.topk(logp, self.top_k, dim=-1)
        return ids, vals


def export_onnx(heads: DraftHeads, top_k: int, path: Path) -> Path:
    heads = heads.eval().float()
    graph = ExportGraph(heads, top_k)
    dummy = torch.zeros(1, heads.hidden_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            graph, (dummy,), str(path), input_names=["hidden"], output_names=["ids", "logprobs"],
            dynamic_axes={"hidden": {0: "batch"}, "ids": {0: "batch"}, "logprobs": {0: "batch"}},
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


def quantize(fp32_path: Path, out_path: Path, scheme: str = "int8-per-channel") -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if scheme in ("int8-per-channel", "int8-per-tensor"):
        quantize_dynamic(
            str(fp32_path), str(out_path), weight_type=QuantType.QInt8,
            per_channel=scheme == "int8-per-channel", op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"MatMulConstBOnly": True},
        )
        return out_path
    if scheme == "int8-u-fp16":
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(fp32_path))
        uname = _u_initializer_name(model)
        excl = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and uname in n.input]
        tmp = out_path.with_suffix(".tmp.onnx")
        quantize_dynamic(
            str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excl,
            extra_options={"MatMulConstBOnly": True},
        )
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
        shutil.move(str(work / "model_quantized.onnx"), out_path)
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


def run_onnx(sess, hidden: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    ids, lps = [], []
    for i in range(0, len(hidden), batch):
        a, b = sess.run(None, {"hidden": np.ascontiguousarray(hidden[i:i + batch], dtype=np.float32)})
        ids.append(a)
        lps.append(b)
    return np.concatenate(ids), np.concatenate(lps)


def parity(heads: DraftHeads, onnx_path: Path, hidden: np.ndarray, top_k: int) -> dict:
    """Top-1 agreement and max |log-prob| gap of an ONNX graph against the torch heads."""
    with torch.no_grad():
        ref_ids, ref_lp = ExportGraph(heads.eval().float(), top_k)(torch.from_numpy(hidden.astype(np.float32)))
    ids, lp = run_onnx(ort_session(onnx_path), hidden)
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
    h = np.random.default_rng(0).standard_normal((64, heads.hidden_size)).astype(np.float32)
    print("fp32", parity(heads, fp32, h, args.top_k))
    print("int8", parity(heads, q, h, args.top_k), q.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
