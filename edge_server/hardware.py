"""Which device and dtype a server (or a script that must match it) runs on, and the allocator
setting its steps need. Kept apart from the CLI so that the training and benchmark scripts pick
the same dtype as the server without importing its command line."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA, and on a CPU with native bf16 dot products, where a wide step (a
    tree, a batch) costs far less than in fp32 (SmolLM2-135M, one thread, a 16-token step:
    120-170 ms with exact attention vs 187 in fp32; one token: about the same) and verification
    is still exact (see
    edge_server.kv_cache.exact_one_token_queries); fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") or cpu_has_bf16() else torch.float32
    return DTYPES[name]


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def keep_freed_memory() -> None:
    """glibc returns every large freed block to the OS and maps it afresh on the next request,
    so a step's temporaries (a few MB each) page-fault on every layer: measured, a 16-node bf16
    tree step took 150-330 ms (bimodal) with the default and 120-170 ms with the heap kept."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
