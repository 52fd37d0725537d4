"""A GGUF file for llama.cpp and Ollama, written with the `gguf` package, and its Ollama Modelfile.

GGUF holds the weights, the hyperparameters and the tokenizer in one file, under llama.cpp's
names. What llama.cpp computes is decided by the architecture string, so the file names the one
whose graph is ours:

    model                                             architecture   why it is exact
    dense, no q/k norm                                llama          the same decoder
    MoE, no shared expert, renormalised top-k         llama          its MoE path renormalises
    MoE, shared experts, renormalised top-k           granitemoe     renormalised top-k, ungated
                                                                     shared experts, scales of 1
    MoE, raw top-k weights (k = 1, or                 bailingmoe     top-k weights renormalised or
      norm_topk_prob false)                                          not (expert_weights_norm);
                                                                     its required shared expert is
                                                                     zeros when the model has none
    per-head q/k norm (MiniMind-3), dense             qwen3          the same decoder
    per-head q/k norm, MoE, renormalised top-k        qwen3moe       its router always renormalises
      (MiniMind-3's rule: top-1 included)

"Renormalised" follows the model family's router (families.renormalises_top_k). Only `llama`
and `granitemoe` read `rope_freqs` (below), so YaRN is refused for the others.

llama.cpp's conventions, which a top-1 token check would not catch:
- `llama`, `granitemoe` and `bailingmoe` rotate adjacent pairs (x_2i, x_2i+1), Meta's original layout, while
  we rotate (x_i, x_i+D/2) as Hugging Face does; q_proj and k_proj rows are permuted within
  each head so that the same pairs rotate (`interleave_rotary_rows`). `qwen3` and `qwen3moe`
  rotate halves like we do: no permutation (nor does llama.cpp's converter permute them); their
  q/k norm gains are `attn_q_norm` / `attn_k_norm`.
- RoPE scaling: llama.cpp's YaRN would add its own attention scaling; instead the file carries
  `rope_freqs`, one divisor per pair (as Llama 3 files do), which is exactly the original's YaRN
  variant, and no scaling type.
- The vocabulary is byte-level BPE (`tokenizer.ggml.model = gpt2`) with its pre-tokenizer named
  (`tokenizer.ggml.pre = gpt-2`, the GPT-2 split regex our ByteLevel pre-tokenizer uses);
  without a known name llama.cpp warns and splits text differently. Special tokens are CONTROL,
  other added tokens USER_DEFINED, padding rows up to the embedding size UNUSED.

Norm gains, the router and rope_freqs stay float32 (as llama.cpp's converter keeps them);
matrices are float32, float16, bfloat16 or q8_0 (blocks of 32 int8 with one float16 scale;
a matrix whose rows are not a multiple of 32 falls back to float16).
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write
from ..model.families import has_qk_norm, renormalises_top_k
from .stock_layouts import TIED_KEY, NotRepresentable, plain_rope, rope_divisors, rotary_of

# --dtype / --quantize -> the GGML type of the matrices and the file type recorded in the header
MATRIX_TYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"),
                "bfloat16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
PRE_TOKENIZER = "gpt-2"
# llama.cpp's LLAMA_ROPE_TYPE_NORM architectures among ours (the others rotate halves)
ADJACENT_PAIR_ARCHITECTURES = ("llama", "granitemoe", "bailingmoe")


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("--to gguf needs the gguf package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------- which llama.cpp graph

def gguf_architecture(config, state):
    """The llama.cpp architecture that computes exactly what the model computes."""
    if config.hidden_act != "silu":
        raise NotRepresentable(f"--to gguf: hidden_act '{config.hidden_act}': llama.cpp's graphs use SiLU")
    if rotary_of(config)[1] != 1.0:
        raise NotRepresentable("--to gguf: a YaRN attention_factor other than 1 (llama.cpp's rope_freqs divide "
                               "frequencies only)")
    if has_qk_norm(state):
        if config.use_moe and (config.n_shared_experts or not renormalises_top_k(config)):
            raise NotRepresentable("--to gguf: llama.cpp's qwen3moe renormalises the top-k weights and has no "
                                   "shared experts")
        if not plain_rope(config):
            raise NotRepresentable(f"--to gguf: llama.cpp's qwen3 graphs have no per-pair rope frequencies for "
                                   f"the {config.family_name} YaRN (and llama.cpp's own YaRN adds an attention "
                                   "temperature); export with inference_rope_scaling off, or use --to qwen3")
        return "qwen3moe" if config.use_moe else "qwen3"
    if not config.use_moe or (config.n_shared_experts == 0 and renormalises_top_k(config)):
        return "llama"
    if renormalises_top_k(config):
        return "granitemoe"
    if rope_divisors(config) is not None:
        raise NotRepresentable("--to gguf: a router without renormalisation maps to llama.cpp's bailingmoe, "
                               "which has no per-pair rope frequencies for the YaRN variant")
    if config.n_shared_experts and config.moe_intermediate_size != config.intermediate_size:
        raise NotRepresentable("--to gguf: llama.cpp's bailingmoe makes its shared experts as wide as the routed "
                               "ones, and this model's are not")
    return "bailingmoe"


def interleave_rotary_rows(weight, heads):
    """Rows of q_proj/k_proj (heads * D, hidden) from the rotate-half order (pair i = rows i, i + D/2
    of a head) to llama.cpp's adjacent order (pair i = rows 2i, 2i + 1): its convert_hf_to_gguf permute."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------- tensors under llama.cpp's names

def gguf_tensors(config, state, architecture):
    """{llama.cpp tensor name: float32 numpy array}, in the architecture's layout."""
    gguf = import_gguf()
    names = {tensor: name + ".weight" for tensor, name in gguf.TENSOR_NAMES.items()}
    T = gguf.MODEL_TENSOR
    adjacent_pairs = architecture in ADJACENT_PAIR_ARCHITECTURES
    out = {names[T.TOKEN_EMBD]: state["model.embed_tokens.weight"], names[T.OUTPUT_NORM]: state["model.norm.weight"]}
    if architecture == "bailingmoe":  # its loader requires an output matrix even when it is the embedding
        out[names[T.OUTPUT]] = state.get(TIED_KEY, state["model.embed_tokens.weight"])
    divisors = rope_divisors(config)
    if divisors is not None:
        out[names[T.ROPE_FREQS]] = torch.tensor(divisors, dtype=torch.float32)
    per_layer = {"input_layernorm": T.ATTN_NORM, "self_attn.v_proj": T.ATTN_V, "self_attn.o_proj": T.ATTN_OUT,
                 "self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM,
                 "post_attention_layernorm": T.FFN_NORM, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP,
                 "mlp.down_proj": T.FFN_DOWN, "mlp.gate": T.FFN_GATE_INP}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for ours, tensor in per_layer.items():
            if prefix + ours + ".weight" in state:
                out[names[tensor].format(bid=layer)] = state[prefix + ours + ".weight"]
        for ours, tensor, heads in (("q_proj", T.ATTN_Q, config.num_attention_heads),
                                    ("k_proj", T.ATTN_K, config.num_key_value_heads)):
            weight = state[f"{prefix}self_attn.{ours}.weight"]
            out[names[tensor].format(bid=layer)] = interleave_rotary_rows(weight, heads) if adjacent_pairs else weight
        if config.use_moe:
            out.update(expert_tensors(config, state, prefix, layer, names, architecture))
    return {name: tensor.detach().float().cpu().numpy() for name, tensor in out.items()}


def expert_tensors(config, state, prefix, layer, names, architecture):
    """Routed experts stacked (E, I, hidden) / (E, hidden, I); shared experts side by side."""
    T = import_gguf().MODEL_TENSOR

    def stacked(kind, count, group="experts"):
        return [state[f"{prefix}mlp.{group}.{i}.{kind}_proj.weight"] for i in range(count)]

    experts = config.n_routed_experts
    out = {names[T.FFN_GATE_EXP].format(bid=layer): torch.stack(stacked("gate", experts)),
           names[T.FFN_UP_EXP].format(bid=layer): torch.stack(stacked("up", experts)),
           names[T.FFN_DOWN_EXP].format(bid=layer): torch.stack(stacked("down", experts))}
    if architecture in ("granitemoe", "bailingmoe"):
        shared = config.n_shared_experts
        if shared:
            gate, up = torch.cat(stacked("gate", shared, "shared_experts")), torch.cat(stacked("up", shared, "shared_experts"))
            down = torch.cat(stacked("down", shared, "shared_experts"), dim=1)
        else:  # bailingmoe requires a shared expert: one of zeros (as wide as an expert) adds exactly 0
            gate = up = torch.zeros(config.moe_intermediate_size, config.hidden_size)
            down = torch.zeros(config.hidden_size, config.moe_intermediate_size)
        out.update({names[T.FFN_GATE_SHEXP].format(bid=layer): gate, names[T.FFN_UP_SHEXP].format(bid=layer): up,
                    names[T.FFN_DOWN_SHEXP].format(bid=layer): down})
    return out


def encode_tensor(name, array, matrix_type):
    """(data, GGML type) for one tensor: vectors and the router in float32, matrices in matrix_type."""
    gguf = import_gguf()
    types = gguf.GGMLQuantizationType
    qtype = types[matrix_type]
    keep_float32 = array.ndim == 1 or ".ffn_gate_inp." in name
    if keep_float32 or qtype == types.F32:
        return np.ascontiguousarray(array, dtype=np.float32), types.F32
    if qtype == types.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        qtype = types.F16
    if qtype == types.F16:
        return np.ascontiguousarray(array, dtype=np.float16), types.F16
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


# ---------------------------------------------------------------- hyperparameters and tokenizer

def write_hyperparameters(writer, config, architecture, file_type):
    gguf = import_gguf()
    writer.add_name("minimind")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    # llama and granitemoe size their routed experts by the feed-forward length; the others by the
    # expert length (qwen3moe keeps MiniMind-3's dense width there, as llama.cpp's converter does)
    expert_sized = config.use_moe and architecture in ("llama", "granitemoe")
    writer.add_feed_forward_length(config.moe_intermediate_size if expert_sized else config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)  # YaRN, if any, is in rope_freqs
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.use_moe:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if architecture == "granitemoe":
        writer.add_expert_shared_feed_forward_length(config.n_shared_experts * config.intermediate_size)
        writer.add_logit_scale(1.0)  # granite divides the logits by it; the other scales default to none
    if architecture == "bailingmoe":
        writer.add_expert_shared_count(max(config.n_shared_experts, 1))
        writer.add_expert_weights_norm(renormalises_top_k(config))
        writer.add_expert_weights_scale(1.0)
        writer.add_leading_dense_block_count(0)


def vocabulary(tokenizer, size):
    """(tokens, token types, merges) of a byte-level BPE tokenizer, padded to the embedding's size."""
    gguf = import_gguf()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise NotRepresentable("--to gguf: only byte-level BPE tokenizers (as MiniMind's) are embedded")
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    by_id.update({token_id: entry["content"] for token_id, entry in added.items()})
    if max(by_id) >= size:
        raise NotRepresentable(f"--to gguf: the tokenizer has ids up to {max(by_id)} but the model's "
                               f"vocabulary has {size} rows")
    tokens, types = [], []
    for token_id in range(size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model.get("merges", [])]
    return tokens, types, merges


def write_tokenizer(writer, tokenizer, config):
    tokens, types, merges = vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # MiniMind prompts carry their own <|im_start|>
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- the file and its Modelfile

def write_gguf(config, state, tokenizer, path, matrix_dtype="float32"):
    """Write a MiniMind config and state dict (float32) with `tokenizer` to one GGUF file at `path`;
    returns the architecture written. matrix_dtype: float32, float16, bfloat16 or q8_0."""
    gguf = import_gguf()
    architecture = gguf_architecture(config, state)
    matrix_type, file_type = MATRIX_TYPES[matrix_dtype]
    tensors = gguf_tensors(config, state, architecture)

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, architecture)
        write_hyperparameters(writer, config, architecture, file_type)
        write_tokenizer(writer, tokenizer, config)
        if matrix_type == "Q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array in tensors.items():
            data, qtype = encode_tensor(name, array, matrix_type)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    os.chmod(path, 0o644)  # mkstemp's 0600 suits secrets, not a model file
    return architecture


# MiniMind2's ChatML pieces: (default system block, an assistant turn's opening, the generation prompt)
MINIMIND2_CHAT = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n", "<|im_start|>assistant\n",
                  "<|im_start|>assistant\n")


def chat_pieces(tokenizer):
    """The three pieces of a ChatML chat template that differ between the families, read by rendering
    it: MiniMind2 adds a default system line, MiniMind-3 none but an empty <think></think> block
    before every answer. MINIMIND2_CHAT when the tokenizer has no ChatML template."""
    if not tokenizer.chat_template:
        return MINIMIND2_CHAT
    user = "<|im_start|>user\nQ<|im_end|>\n"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                           add_generation_prompt=True)
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                                         tokenize=False)
    if user not in prompt or user not in turn or "A<|im_end|>" not in turn:
        return MINIMIND2_CHAT
    default_system, generation = prompt.split(user)
    opening = turn.split(user)[1].split("A<|im_end|>")[0]
    return default_system, opening, generation


def ollama_template(tokenizer):
    """The tokenizer's ChatML chat template as Ollama's Go template, with its family's default system
    line and answer opening (chat_pieces; no whitespace-trimming markers: every newline is part of
    the format)."""
    default_system, opening, generation = chat_pieces(tokenizer)
    return (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
        f"{{{{ else }}}}{default_system}{{{{ end }}}}"
        f"{{{{ range .Messages }}}}{{{{ if eq .Role \"assistant\" }}}}{opening}{{{{ .Content }}}}<|im_end|>\n"
        "{{ else if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        f"{{{{ end }}}}{{{{ end }}}}{generation}"
    )


def modelfile(gguf_name, tokenizer, stop_tokens):
    """An Ollama Modelfile beside the GGUF: the file, the ChatML template, the stop tokens."""
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{ollama_template(tokenizer)}"""', ""]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    return "\n".join(lines) + "\n"


def write_gguf_directory(model, tokenizer, out_dir, matrix_dtype, stop_tokens):
    """model-<type>.gguf and its Modelfile in out_dir; returns (gguf path, architecture)."""
    name = f"model-{MATRIX_TYPES[matrix_dtype][0].lower()}.gguf"
    architecture = write_gguf(model.config, model.state_dict(), tokenizer, Path(out_dir) / name, matrix_dtype)
    (Path(out_dir) / "Modelfile").write_text(modelfile(name, tokenizer, stop_tokens))
    return Path(out_dir) / name, architecture
