#!/usr/bin/env python3
"""Independent numpy reference for Llama-family decoders (Llama / SmolLM2, Qwen2).

This script is deliberately self-contained and shares no code with the Rust crate.
It computes forward passes in float64 and writes small JSON fixtures that the Rust
parity tests read.

Re-running
----------
    pip install -r tests/reference/requirements.txt
    cd <repo root>
    python3 tests/reference/llama_reference.py all          # everything below
    python3 tests/reference/llama_reference.py smollm2      # needs models/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 tests/reference/llama_reference.py tiny-qwen2
    python3 tests/reference/llama_reference.py tokenizer    # needs the GGUF too (tokenizer metadata)

`--gguf PATH` overrides the default model path (smollm2 / tokenizer / all).

Outputs (all under tests/fixtures/)
-----------------------------------
    smollm2_reference.json      logits of SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to f32,
                                computed in f64) for three prompts, and a 12-token greedy decode.
    tiny-qwen2/config.json      a tiny random Qwen2-style model (q/k/v biases, untied lm_head)
    tiny-qwen2/model.safetensors   its f32 weights with Hugging Face tensor names
    tiny_qwen2_reference.json   full logits of the tiny model for two id sequences.
    tokenizer_reference.json    ids / tokens / decode round-trips of the SmolLM2 tokenizer
                                rebuilt from the GGUF metadata with the `tokenizers` package.

Conventions
-----------
* Every weight matrix is held as (out_features, in_features); a linear layer is y = x @ W.T (+ b).
* RoPE uses the Hugging Face "rotate-half" layout: within each head the first half of the
  dimensions pairs with the second half (dim i with dim i + head_dim/2), frequency
  inv_freq[i] = theta ** (-2i / head_dim).
* GGUF files written by llama.cpp's converter store attn_q / attn_k rows permuted for the
  interleaved (GPT-J style, pairs (2i, 2i+1)) RoPE. `unpermute_qk` undoes it so the
  rotate-half RoPE applies. `smollm2` also checks that the raw GGUF weights with interleaved
  RoPE give the same logits, which pins the direction of the permutation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, asdict

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
DEFAULT_GGUF = os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# --------------------------------------------------------------------------------------
# Model definition
# --------------------------------------------------------------------------------------


@dataclass
class Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Weights use Hugging Face names (without the "model." prefix handling done by the loaders):
#   embed_tokens                (vocab, hidden)
#   layers[i]["input_layernorm"]           (hidden,)
#   layers[i]["q_proj"], ["k_proj"], ["v_proj"], ["o_proj"]   (out, in)
#   layers[i]["q_bias"], ["k_bias"], ["v_bias"]               optional (out,)
#   layers[i]["post_attention_layernorm"]  (hidden,)
#   layers[i]["gate_proj"], ["up_proj"]    (intermediate, hidden)
#   layers[i]["down_proj"]                 (hidden, intermediate)
#   norm                        (hidden,)
#   lm_head                     (vocab, hidden)  (== embed_tokens when tied)


@dataclass
class Model:
    config: Config
    embed_tokens: np.ndarray
    layers: list
    norm: np.ndarray
    lm_head: np.ndarray


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(var + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_tables(positions: np.ndarray, head_dim: int, theta: float):
    """cos/sin tables of shape (T, head_dim), rotate-half layout."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, hd)
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope_rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (heads, T, hd)."""
    return x * cos[None] + rotate_half(x) * sin[None]


def apply_rope_interleaved(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """GPT-J / llama.cpp 'normal' RoPE: rotates pairs (2i, 2i+1). Only used for a cross-check."""
    hd = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
    c, s = np.cos(ang)[None], np.sin(ang)[None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def forward(model: Model, ids, rope: str = "rotate_half", dtype=np.float64) -> np.ndarray:
    """Full causal forward pass over `ids` starting at position 0. Returns logits (T, vocab).

    The fixtures use dtype=float64 (with float64 weights); dtype=float32 (with a model loaded
    as float32) gives an estimate of the error an f32 implementation should expect."""
    cfg = model.config
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = H // KV
    positions = np.arange(T)
    cos, sin = (t.astype(dtype) for t in rope_tables(positions, hd, cfg.rope_theta))
    causal = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)  # (T, T): -inf above the diagonal
    scale = dtype(1.0 / math.sqrt(hd))

    x = model.embed_tokens[ids].astype(dtype)  # (T, d)
    for layer in model.layers:
        # --- attention block ---
        h = rms_norm(x, layer["input_layernorm"], cfg.rms_norm_eps)
        q = h @ layer["q_proj"].T
        k = h @ layer["k_proj"].T
        v = h @ layer["v_proj"].T
        if "q_bias" in layer:
            q = q + layer["q_bias"]
            k = k + layer["k_bias"]
            v = v + layer["v_bias"]
        q = q.reshape(T, H, hd).transpose(1, 0, 2)  # (H, T, hd)
        k = k.reshape(T, KV, hd).transpose(1, 0, 2)  # (KV, T, hd)
        v = v.reshape(T, KV, hd).transpose(1, 0, 2)
        if rope == "rotate_half":
            q = apply_rope_rotate_half(q, cos, sin)
            k = apply_rope_rotate_half(k, cos, sin)
        elif rope == "interleaved":
            q = apply_rope_interleaved(q, positions, cfg.rope_theta)
            k = apply_rope_interleaved(k, positions, cfg.rope_theta)
        else:
            raise ValueError(rope)
        # GQA: query head j uses kv head j // group
        k = np.repeat(k, group, axis=0)  # (H, T, hd)
        v = np.repeat(v, group, axis=0)
        scores = (q @ k.transpose(0, 2, 1)) * scale + causal[None]  # (H, T, T)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis=-1, keepdims=True)
        attn = probs @ v  # (H, T, hd)
        attn = attn.transpose(1, 0, 2).reshape(T, H * hd)
        x = x + attn @ layer["o_proj"].T
        # --- MLP block ---
        h = rms_norm(x, layer["post_attention_layernorm"], cfg.rms_norm_eps)
        mlp = silu(h @ layer["gate_proj"].T) * (h @ layer["up_proj"].T)
        x = x + mlp @ layer["down_proj"].T
    x = rms_norm(x, model.norm, cfg.rms_norm_eps)
    return x @ model.lm_head.T  # (T, vocab)


def logsumexp(v: np.ndarray) -> float:
    m = float(np.max(v))
    return m + float(np.log(np.sum(np.exp(v - m))))


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permutation of attn_q / attn_k rows.

    The converter did (HF -> GGUF):  w.reshape(n_heads, 2, hd/2, in).swapaxes(1, 2).reshape(out, in),
    i.e. GGUF row (h, 2*i + a) = HF row (h, a*hd/2 + i). The inverse is therefore
    reshape(n_heads, hd/2, 2, in).swapaxes(1, 2).
    """
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: str, dtype=np.float64, permute_qk: bool = True):
    """Returns (Model, GGUFReader). permute_qk=False keeps the raw GGUF row order (for the
    interleaved-RoPE cross-check)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()

    def meta(key, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    cfg = Config(
        hidden_size=int(meta("embedding_length")),
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=int(meta("attention.head_count")),
        num_key_value_heads=int(meta("attention.head_count_kv")),
        vocab_size=0,  # filled from the embedding below
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings=True,
        attention_bias=False,
        max_position_embeddings=int(meta("context_length", 2048)),
    )
    tensors = {}
    for t in reader.tensors:
        # dequantize returns numpy with shape reversed w.r.t. ggml ne: (ne1, ne0) = (out, in)
        tensors[t.name] = dequantize(t.data, t.tensor_type).astype(dtype)

    def get(name):
        return tensors.pop(name)

    embed = get("token_embd.weight")
    cfg.vocab_size = embed.shape[0]
    assert embed.shape == (cfg.vocab_size, cfg.hidden_size), embed.shape
    if "output.weight" in tensors:
        lm_head = get("output.weight")
        cfg.tie_word_embeddings = False
    else:
        lm_head = embed
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"blk.{i}."
        L = {
            "input_layernorm": get(p + "attn_norm.weight"),
            "q_proj": get(p + "attn_q.weight"),
            "k_proj": get(p + "attn_k.weight"),
            "v_proj": get(p + "attn_v.weight"),
            "o_proj": get(p + "attn_output.weight"),
            "post_attention_layernorm": get(p + "ffn_norm.weight"),
            "gate_proj": get(p + "ffn_gate.weight"),
            "up_proj": get(p + "ffn_up.weight"),
            "down_proj": get(p + "ffn_down.weight"),
        }
        for b, n in (("q_bias", "attn_q.bias"), ("k_bias", "attn_k.bias"), ("v_bias", "attn_v.bias")):
            if p + n in tensors:
                L[b] = get(p + n)
                cfg.attention_bias = True
        if permute_qk:
            L["q_proj"] = unpermute_qk(L["q_proj"], H)
            L["k_proj"] = unpermute_qk(L["k_proj"], KV)
            # (biases would need the same row permutation; Llama GGUFs have none)
            if "q_bias" in L:
                L["q_bias"] = unpermute_qk(L["q_bias"][:, None], H)[:, 0]
                L["k_bias"] = unpermute_qk(L["k_bias"][:, None], KV)[:, 0]
        d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        assert L["q_proj"].shape == (H * hd, d)
        assert L["k_proj"].shape == (KV * hd, d) and L["v_proj"].shape == (KV * hd, d)
        assert L["o_proj"].shape == (d, H * hd)
        assert L["gate_proj"].shape == (f, d) and L["up_proj"].shape == (f, d)
        assert L["down_proj"].shape == (d, f)
        layers.append(L)
    norm = get("output_norm.weight")
    tensors.pop("rope_freqs.weight", None)
    assert not tensors, f"unused GGUF tensors: {sorted(tensors)[:10]}"
    return Model(cfg, embed, layers, norm, lm_head), reader


HF_LAYER_NAMES = {
    "input_layernorm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}


def load_hf_dir(path: str, dtype=np.float64) -> Model:
    from safetensors.numpy import load_file

    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    cfg = Config(
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        vocab_size=c["vocab_size"],
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", 10000.0),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        attention_bias=c.get("attention_bias", c.get("model_type") == "qwen2"),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
    )
    st = {k: v.astype(dtype) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    embed = st.pop("model.embed_tokens.weight")
    layers = []
    for i in range(cfg.num_hidden_layers):
        L = {}
        for key, hf in HF_LAYER_NAMES.items():
            name = f"model.layers.{i}.{hf}"
            if name in st:
                L[key] = st.pop(name)
            elif key.endswith("_bias"):
                assert not cfg.attention_bias, f"missing {name}"
            else:
                raise KeyError(name)
        layers.append(L)
    norm = st.pop("model.norm.weight")
    lm_head = st.pop("lm_head.weight", None)
    if lm_head is None:
        assert cfg.tie_word_embeddings, "no lm_head.weight and tie_word_embeddings is false"
        lm_head = embed
    assert not st, f"unused safetensors tensors: {sorted(st)}"
    return Model(cfg, embed, layers, norm, lm_head)


# --------------------------------------------------------------------------------------
# Tokenizer (rebuilt from GGUF metadata with the `tokenizers` package)
# --------------------------------------------------------------------------------------


def build_tokenizer(reader):
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers

    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    assert all(len(m) == 2 for m in merges)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # token types: 1 normal, 2 unknown, 3 control (special), 4 user-defined (added), 5 unused, 6 byte
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
    added = [AddedToken(tokens[i], special=False, normalized=False) for i, ty in enumerate(types) if ty == 4]
    tok.add_special_tokens(specials)
    if added:
        tok.add_tokens(added)
    # ids must not have moved
    for i, ty in enumerate(types):
        if ty in (3, 4):
            assert tok.token_to_id(tokens[i]) == i
    return tok


def check_tokenizer_facts(tok):
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.encode("user", add_special_tokens=False).ids == [4093], tok.encode("user").ids
    assert tok.encode("\n", add_special_tokens=False).ids == [198]


# --------------------------------------------------------------------------------------
# JSON output helpers
# --------------------------------------------------------------------------------------


def f32(x) -> float:
    """Round to float32 and return the shortest decimal that round-trips that float32."""
    return float(str(np.float32(x)))


def f64(x) -> float:
    return float(f"{float(x):.12g}")


def dumps(obj, indent=0) -> str:
    """JSON with dicts indented, lists of scalars on one line, lists of lists one row per line."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad} {json.dumps(k)}: {dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (list, tuple, dict)) for v in obj):
            return "[" + ",".join(json.dumps(v, ensure_ascii=False) for v in obj) + "]"
        rows = [pad + " " + dumps(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: str, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(obj) + "\n")
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------

PROMPTS = [
    ("P1", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
    (
        "P2",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    ),
    ("P3", "The 3 quick brown foxes jumped over 12 lazy dogs."),
]
GREEDY_TOKENS = 12
EXPECTED_ANSWER = "The capital of France is Paris."


def fixed_vocab_ids(vocab_size: int) -> list:
    spread = np.linspace(97, vocab_size - 1, 32).round().astype(int).tolist()
    ids = list(range(32)) + spread
    assert len(set(ids)) == 64
    return ids


def cmd_smollm2(gguf_path: str):
    model, reader = load_gguf(gguf_path)
    cfg = model.config
    print("config:", asdict(cfg))
    tok = build_tokenizer(reader)
    check_tokenizer_facts(tok)
    vocab_ids = fixed_vocab_ids(cfg.vocab_size)

    prompts = []
    for name, text in PROMPTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        logits = forward(model, ids)
        last = logits[-1]
        top = np.argsort(-last, kind="stable")[:20]
        prompts.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "logits": [[f32(v) for v in row[vocab_ids]] for row in logits],
                "top20": [[int(i), f32(last[i])] for i in top],
                "logsumexp": f64(logsumexp(last)),
            }
        )
        print(f"{name}: {len(ids)} tokens, argmax last = {int(top[0])} {tok.decode([int(top[0])])!r}")
        if name == "P1":
            # Cross-check the direction of the Q/K un-permutation: raw GGUF rows + interleaved
            # RoPE must give the same logits as un-permuted rows + rotate-half RoPE.
            raw, _ = load_gguf(gguf_path, permute_qk=False)
            alt = forward(raw, ids, rope="interleaved")
            diff = float(np.max(np.abs(alt - logits)))
            print(f"  interleaved-RoPE cross-check: max |diff| = {diff:.3e}")
            assert diff < 1e-8, diff
            del raw, alt

    # Greedy decode after P1 (no stopping at <|im_end|>: exactly GREEDY_TOKENS argmax steps).
    ids = list(prompts[0]["ids"])
    gen, margins = [], []
    for _ in range(GREEDY_TOKENS):
        last = forward(model, ids)[-1]
        order = np.argsort(-last, kind="stable")
        nxt = int(order[0])
        margins.append(f64(last[order[0]] - last[order[1]]))
        gen.append(nxt)
        ids.append(nxt)
    eos = 2
    until_eos = gen[: gen.index(eos)] if eos in gen else gen
    answer = tok.decode(until_eos, skip_special_tokens=False)
    print("greedy ids:", gen)
    print("greedy text:", repr(tok.decode(gen, skip_special_tokens=False)))
    assert answer == EXPECTED_ANSWER, f"greedy answer {answer!r} != {EXPECTED_ANSWER!r}"

    fixture = {
        "description": "numpy float64 reference forward pass of SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF "
        "dequantised to f32 with gguf-py, then computed in float64). Generated by "
        "tests/reference/llama_reference.py smollm2.",
        "model": os.path.basename(gguf_path),
        "model_sha256": sha256(gguf_path),
        "config": asdict(cfg) | {"head_dim": cfg.head_dim},
        "vocab_ids": vocab_ids,
        "prompts": prompts,
        "greedy": {
            "prompt": "P1",
            "n_tokens": GREEDY_TOKENS,
            "ids": gen,
            "text": tok.decode(gen, skip_special_tokens=False),
            "text_until_eos": answer,
            "margins": margins,
        },
    }
    write_json(os.path.join(FIXTURES, "smollm2_reference.json"), fixture)


TINY_SEED = 20240611
TINY_SEQS = [
    [1, 17, 200, 42, 42, 255, 0],
    [5, 99, 3, 128, 64, 7, 250, 31, 31, 31, 180, 2, 77],
]


def make_tiny_qwen2(out_dir: str):
    from safetensors.numpy import save_file

    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "sliding_window": 128,
        "max_window_layers": 2,
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }
    rng = np.random.default_rng(TINY_SEED)
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kvd = cfg["num_key_value_heads"] * hd

    def w(*shape):
        return rng.normal(0.0, 0.05, size=shape).astype(np.float32)

    def norm():
        return (1.0 + rng.normal(0.0, 0.1, size=(d,))).astype(np.float32)

    def bias(n):
        return rng.normal(0.0, 0.1, size=(n,)).astype(np.float32)

    st = {"model.embed_tokens.weight": w(V, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        st[p + "input_layernorm.weight"] = norm()
        st[p + "self_attn.q_proj.weight"] = w(d, d)
        st[p + "self_attn.q_proj.bias"] = bias(d)
        st[p + "self_attn.k_proj.weight"] = w(kvd, d)
        st[p + "self_attn.k_proj.bias"] = bias(kvd)
        st[p + "self_attn.v_proj.weight"] = w(kvd, d)
        st[p + "self_attn.v_proj.bias"] = bias(kvd)
        st[p + "self_attn.o_proj.weight"] = w(d, d)
        st[p + "post_attention_layernorm.weight"] = norm()
        st[p + "mlp.gate_proj.weight"] = w(f, d)
        st[p + "mlp.up_proj.weight"] = w(f, d)
        st[p + "mlp.down_proj.weight"] = w(d, f)
    st["model.norm.weight"] = norm()
    st["lm_head.weight"] = w(V, d)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
        fh.write("\n")
    save_file(st, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "model.safetensors"):
        p = os.path.join(out_dir, name)
        print(f"wrote {os.path.relpath(p, REPO)} ({os.path.getsize(p)} bytes)")


def cmd_tiny_qwen2():
    out_dir = os.path.join(FIXTURES, "tiny-qwen2")
    make_tiny_qwen2(out_dir)
    model = load_hf_dir(out_dir)  # read back through the HF loader (f32 weights -> float64)
    sequences = []
    for ids in TINY_SEQS:
        assert all(0 <= i < model.config.vocab_size for i in ids)
        logits = forward(model, ids)
        # causality check: a prefix gives the same logits
        pre = forward(model, ids[:4])
        assert np.max(np.abs(pre - logits[:4])) < 1e-12
        sequences.append({"ids": ids, "logits": [[f64(v) for v in row] for row in logits]})
        print(f"tiny-qwen2: len {len(ids)} argmax {logits.argmax(-1).tolist()}")
    fixture = {
        "description": "numpy float64 reference logits of the random tiny Qwen2-style model in "
        "tests/fixtures/tiny-qwen2 (f32 weights read back from model.safetensors, computed in "
        "float64). Generated by tests/reference/llama_reference.py tiny-qwen2.",
        "model_dir": "tiny-qwen2",
        "seed": TINY_SEED,
        "config": asdict(model.config) | {"head_dim": model.config.head_dim},
        "sequences": sequences,
    }
    write_json(os.path.join(FIXTURES, "tiny_qwen2_reference.json"), fixture)


TOKENIZER_CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "Pi is 3.14159 and 2024-06-11 is a date; 1,000,000 apples.",
    "héllo 世界 🙂",
    "def f(x):\n\treturn x * 2\n\n\nprint(f(21))\n",
    "multiple   spaces    here  and\ttabs\t\tand trailing   ",
    "  leading spaces",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Don't stop: it's we'll they've I'M, CamelCaseWord snake_case_word.",
    "\n\n\r\n  \n",
    "Ünïcödé: naïve café — “quotes” ‘single’ … €100 ½",
]


def cmd_tokenizer(gguf_path: str):
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    tok = build_tokenizer(reader)
    check_tokenizer_facts(tok)
    cases = []
    for text in TOKENIZER_CASES:
        enc = tok.encode(text, add_special_tokens=False)
        decoded = tok.decode(enc.ids, skip_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": enc.ids,
                "tokens": enc.tokens,
                "decoded": decoded,
                "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True),
                "roundtrip": decoded == text,
            }
        )
        print(f"{len(enc.ids):3d} ids, roundtrip={decoded == text}: {text!r}")
    import tokenizers

    fixture = {
        "description": "SmolLM2 tokenizer rebuilt from the GGUF metadata (tokenizer.ggml.tokens/merges/"
        "token_type) with the python `tokenizers` package: byte-level BPE, pre-tokenizer "
        "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)], "
        "ByteLevel decoder, token_type 3 = special tokens (parsed inline). No BOS/EOS added. "
        "Generated by tests/reference/llama_reference.py tokenizer.",
        "model": os.path.basename(gguf_path),
        "tokenizers_version": tokenizers.__version__,
        "special_tokens": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
        "cases": cases,
    }
    write_json(os.path.join(FIXTURES, "tokenizer_reference.json"), fixture)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["smollm2", "tiny-qwen2", "tokenizer", "all"])
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="GGUF model for smollm2/tokenizer")
    args = ap.parse_args(argv)
    if args.command in ("tokenizer", "all"):
        cmd_tokenizer(args.gguf)
    if args.command in ("tiny-qwen2", "all"):
        cmd_tiny_qwen2()
    if args.command in ("smollm2", "all"):
        cmd_smollm2(args.gguf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
