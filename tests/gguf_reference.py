"""A GGUF file read back with gguf's reader and run with numpy as llama.cpp runs it.

Independent of minimind's model code: only the file is read, and llama.cpp's conventions are
applied (adjacent rotary pairs for `llama`, `granitemoe` and `bailingmoe`, halves for `qwen3`;
rope_freqs as per-pair divisors; the router renormalised per architecture; granite's scales). A wrong permutation, a missing
key or a wrong tensor layout changes these logits.
"""
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ADJACENT_PAIR_ARCHITECTURES = ("llama", "granitemoe", "bailingmoe")


VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def read_gguf(path, with_vocabulary=False):
    """(metadata {key: value}, tensors {name: float32 array in numpy order}, {name: GGML type name});
    the vocabulary arrays (slow to turn into Python lists) only when asked."""
    reader = GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("GGUF.") and (with_vocabulary or name not in VOCABULARY_KEYS)}
    tensors = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32).reshape(t.shape[::-1].tolist())
               for t in reader.tensors}
    return metadata, tensors, {t.name: t.tensor_type.name for t in reader.tensors}


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rotate(x, positions, base, divisors, adjacent):
    """x (S, heads, D) rotated by position * base^(-2i/D) / divisor_i, pairs as the architecture has them."""
    dim = x.shape[-1]
    freqs = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim) / divisors
    angles = positions[:, None, None] * freqs  # (S, 1, D/2)
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = (x[..., 0::2], x[..., 1::2]) if adjacent else (x[..., : dim // 2], x[..., dim // 2:])
    turned = (first * cos - second * sin, second * cos + first * sin)
    out = np.empty_like(x, dtype=np.float64)
    if adjacent:
        out[..., 0::2], out[..., 1::2] = turned
    else:
        out[..., : dim // 2], out[..., dim // 2:] = turned
    return out


def attention(q, k, v, scale):
    """Causal grouped-query attention: q (S, H, D), k and v (S, G, D) -> (S, H * D)."""
    seq, heads, dim = q.shape
    group = heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("shd,thd->hst", q, k) * (scale or 1 / np.sqrt(dim))
    scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hst,thd->shd", weights, v).reshape(seq, heads * dim)


def swiglu(x, gate, up, down):
    g = x @ gate.T
    return (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T


def mixture(x, t, meta, arch, layer):
    """llama.cpp's build_moe_ffn with a softmax router, then the shared experts, if any."""
    blk = f"blk.{layer}."
    top_k = int(meta[f"{arch}.expert_used_count"])
    renormalise = arch in ("llama", "granitemoe", "qwen3moe") or bool(meta.get(f"{arch}.expert_weights_norm", False))
    logits = x @ t[blk + "ffn_gate_inp.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for row in range(x.shape[0]):
        chosen = np.argsort(-probs[row])[:top_k]
        weights = probs[row, chosen] / (probs[row, chosen].sum() if renormalise else 1.0)
        for expert, weight in zip(chosen, weights):
            out[row] += weight * swiglu(x[row], t[blk + "ffn_gate_exps.weight"][expert],
                                        t[blk + "ffn_up_exps.weight"][expert], t[blk + "ffn_down_exps.weight"][expert])
    if blk + "ffn_gate_shexp.weight" in t:
        out += swiglu(x, t[blk + "ffn_gate_shexp.weight"], t[blk + "ffn_up_shexp.weight"], t[blk + "ffn_down_shexp.weight"])
    return out


def gguf_logits(path, token_ids):
    """Logits (S, vocab) of one sequence, computed from the GGUF file alone."""
    meta, tensors, _ = read_gguf(path)
    return logits_from(meta, tensors, token_ids)


def logits_from(meta, t, token_ids):
    """The forward pass on a file's metadata and tensors (as read_gguf returns them)."""
    arch = meta["general.architecture"]
    heads, kv_heads = int(meta[f"{arch}.attention.head_count"]), int(meta[f"{arch}.attention.head_count_kv"])
    eps, base = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]), float(meta[f"{arch}.rope.freq_base"])
    divisors = t.get("rope_freqs.weight", 1.0)
    adjacent = arch in ADJACENT_PAIR_ARCHITECTURES
    positions = np.arange(len(token_ids), dtype=np.float64)
    # granite's multipliers; absent (0) means none, as in llama.cpp
    scales = {name: float(meta.get(f"{arch}.{name}", 0.0)) for name in ("embedding_scale", "residual_scale",
                                                                      "attention.scale", "logit_scale")}
    x = t["token_embd.weight"][token_ids].astype(np.float64) * (scales["embedding_scale"] or 1.0)
    for layer in range(int(meta[f"{arch}.block_count"])):
        blk = f"blk.{layer}."
        h = rms_norm(x, t[blk + "attn_norm.weight"], eps)
        q = (h @ t[blk + "attn_q.weight"].T).reshape(len(token_ids), heads, -1)
        k = (h @ t[blk + "attn_k.weight"].T).reshape(len(token_ids), kv_heads, -1)
        v = (h @ t[blk + "attn_v.weight"].T).reshape(len(token_ids), kv_heads, -1)
        if blk + "attn_q_norm.weight" in t:
            q, k = rms_norm(q, t[blk + "attn_q_norm.weight"], eps), rms_norm(k, t[blk + "attn_k_norm.weight"], eps)
        q, k = rotate(q, positions, base, divisors, adjacent), rotate(k, positions, base, divisors, adjacent)
        residual = scales["residual_scale"] or 1.0
        x = x + residual * attention(q, k, v, scales["attention.scale"]) @ t[blk + "attn_output.weight"].T
        h = rms_norm(x, t[blk + "ffn_norm.weight"], eps)
        if blk + "ffn_gate_inp.weight" in t:
            x = x + residual * mixture(h, t, meta, arch, layer)
        else:
            x = x + residual * swiglu(h, t[blk + "ffn_gate.weight"], t[blk + "ffn_up.weight"], t[blk + "ffn_down.weight"])
    output = t.get("output.weight", t["token_embd.weight"])
    return rms_norm(x, t["output_norm.weight"], eps) @ output.T / (scales["logit_scale"] or 1.0)
