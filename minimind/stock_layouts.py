"""MiniMind models in the stock layouts of transformers, and back.

A stock layout is a directory that `transformers` opens alone (no `import minimind`, no
`trust_remote_code`): a config.json whose model_type transformers knows, and weights under that
architecture's names. MiniMind2's dense decoder computes exactly what Llama computes (RMSNorm
normalising in float32 before the gain, rotate-half rotary embeddings, grouped-query attention,
SwiGLU, a tied lm_head), so its weights keep their names. A mixture of experts maps to the stock
layout whose router computes the same weights:

    model                                   layout (model_type)    why it is exact
    dense, no q/k norm                      llama                  the same decoder
    MoE, no shared expert, renormalised     mixtral                softmax, top-k, renormalise
    MoE, shared experts, renormalised       granitemoeshared       softmax over the top-k logits
                                                                   (= renormalised top-k), an
                                                                   ungated shared MLP (the shared
                                                                   experts side by side), all
                                                                   multipliers 1
    MoE, no shared expert, raw top-k        qwen2_moe              norm_topk_prob false; its
                                                                   sigmoid-gated shared expert
                                                                   is written as zeros: adds 0
    dense with per-head q/k norm            qwen3
    MoE with per-head q/k norm              qwen3_moe

"Renormalised" is our router's rule: top-k weights divided by their sum when k > 1 and
norm_topk_prob (with k = 1 the raw probability). Shared experts with raw top-k weights have no
stock layout (Qwen2-MoE gates its shared expert with a sigmoid, which is never exactly 1;
GraniteMoeShared always renormalises): `choose_layout` refuses them in one line.

The original's YaRN variant scales each rotary pair by its own factor; transformers' `yarn`
rope type ramps differently, but `longrope` with equal short and long factors and
attention_factor 1 applies any per-pair factors, so it is written that way (and the YaRN
parameters are kept in the config, so that reading it back restores them).

Reading back (`minimind_config`, `minimind_state_dict`) accepts what `export` writes and any
checkpoint of these layouts whose features MiniMind has; anything else is refused with the
feature that is missing.
"""
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .config import MiniMindConfig
from .errors import CheckpointError, UserError
from .model import rotary_frequencies

TIED_KEY = "lm_head.weight"


class NotRepresentable(UserError):
    """The model computes something the requested layout cannot express exactly."""


# ---------------------------------------------------------------- what the model computes

def has_qk_norm(state):
    """Whether the weights carry per-head q/k RMSNorm gains (MiniMind-3 does, MiniMind2 does not)."""
    return any(key.endswith("self_attn.q_norm.weight") for key in state)


def renormalises_top_k(config):
    """Our router's rule (MoEGate): top-k weights sum to 1 when k > 1 and norm_topk_prob."""
    return config.num_experts_per_tok > 1 and bool(config.norm_topk_prob)


def yarn_of(config):
    """The YaRN parameters the model's rotary table uses, or None (RotaryEmbedding.tables' choice)."""
    return config.yarn_parameters if config.inference_rope_scaling else None


def rope_divisors(config):
    """Per-pair divisors of the plain rotary frequencies, (head_dim / 2) floats, or None when the
    model uses plain RoPE (YaRN off, or a table that fits the training context)."""
    args = (config.head_dim, config.max_position_embeddings, config.rope_theta)
    plain, scaled = rotary_frequencies(*args), rotary_frequencies(*args, yarn_of(config))
    if torch.equal(plain, scaled):
        return None
    return (plain.double() / scaled.double()).tolist()


# ---------------------------------------------------------------- config.json of each layout

def rope_parameters(config):
    """transformers' rope_parameters for the model: default, or longrope with our per-pair divisors."""
    divisors = rope_divisors(config)
    if divisors is None:
        return {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    original = config.yarn_parameters["original_max_position_embeddings"]
    return {"rope_type": "longrope", "rope_theta": float(config.rope_theta), "short_factor": divisors,
            "long_factor": divisors, "attention_factor": 1.0, "original_max_position_embeddings": original,
            "factor": config.max_position_embeddings / original}


def common_fields(config):
    """What every layout shares: sizes, norm epsilon, RoPE, the tied embedding, special token ids."""
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters(config), tie_word_embeddings=True, attention_dropout=0.0,
        initializer_range=config.initializer_range, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    if config.inference_rope_scaling and fields["rope_parameters"]["rope_type"] == "longrope":
        # not read by transformers; lets load_model restore the YaRN parameters exactly
        fields.update(inference_rope_scaling=True, yarn_parameters=dict(config.yarn_parameters))
    return fields


def llama_fields(config):
    return dict(head_dim=config.head_dim, attention_bias=False, mlp_bias=False)


def mixtral_fields(config):
    return dict(head_dim=config.head_dim, num_local_experts=config.n_routed_experts,
                num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.aux_loss_alpha,
                sliding_window=None)


def granite_fields(config):
    return dict(num_local_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                router_aux_loss_coef=config.aux_loss_alpha, attention_bias=False,
                shared_intermediate_size=config.n_shared_experts * config.intermediate_size,
                embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
                attention_multiplier=config.head_dim ** -0.5)


def qwen2_moe_fields(config):
    return dict(num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                moe_intermediate_size=config.intermediate_size, norm_topk_prob=renormalises_top_k(config),
                shared_expert_intermediate_size=1, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                use_sliding_window=False, router_aux_loss_coef=config.aux_loss_alpha)


def qwen3_fields(config):
    return dict(head_dim=config.head_dim, attention_bias=False, use_sliding_window=False)


def qwen3_moe_fields(config):
    return dict(qwen3_fields(config), num_experts=config.n_routed_experts,
                num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.intermediate_size,
                norm_topk_prob=renormalises_top_k(config), decoder_sparse_step=1, mlp_only_layers=[],
                router_aux_loss_coef=config.aux_loss_alpha)


# ---------------------------------------------------------------- weight names of each layout

MLP_KEY = re.compile(r"(model\.layers\.\d+\.)mlp\.(.+)")
EXPERT_KEY = re.compile(r"experts\.(\d+)\.(gate|up|down)_proj\.weight")
SHARED_KEY = re.compile(r"shared_experts\.(\d+)\.(gate|up|down)_proj\.weight")


def split_by_layer_mlp(state, mlp_prefix):
    """(tensors outside the MLPs, {layer prefix: {name inside that layer's MLP: tensor}})."""
    pattern = re.compile(r"(model\.layers\.\d+\.)" + re.escape(mlp_prefix) + r"(.+)")
    rest, mlps = {}, {}
    for key, tensor in state.items():
        match = pattern.fullmatch(key)
        if match:
            mlps.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif key != TIED_KEY:
            rest[key] = tensor
    return rest, mlps


def experts_of(mlp, pattern=EXPERT_KEY):
    """{expert index: {"gate"|"up"|"down": tensor}} from one layer's MLP tensors."""
    experts = {}
    for key, tensor in mlp.items():
        match = pattern.fullmatch(key)
        if match:
            experts.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    return [experts[i] for i in sorted(experts)]


def same_names(state, config):
    """Dense Llama/Qwen3 and Qwen3-MoE use our names; only the tied copy is dropped."""
    return {key: tensor for key, tensor in state.items() if key != TIED_KEY}


MIXTRAL_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}


def to_mixtral(state, config):
    out, mlps = split_by_layer_mlp(state, "mlp.")
    for layer, mlp in mlps.items():
        out[f"{layer}block_sparse_moe.gate.weight"] = mlp["gate.weight"]
        for index, expert in enumerate(experts_of(mlp)):
            for kind, name in MIXTRAL_NAMES.items():
                out[f"{layer}block_sparse_moe.experts.{index}.{name}.weight"] = expert[kind]
    return out


def from_mixtral(state, fields):
    out, mlps = split_by_layer_mlp(state, "block_sparse_moe.")
    ours = {name: kind for kind, name in MIXTRAL_NAMES.items()}
    for layer, mlp in mlps.items():
        for key, tensor in mlp.items():
            match = re.fullmatch(r"experts\.(\d+)\.(w[123])\.weight", key)
            name = f"experts.{match.group(1)}.{ours[match.group(2)]}_proj.weight" if match else key
            out[f"{layer}mlp.{name}"] = tensor
    return out


def to_granite(state, config):
    """Experts stacked as (E, 2I, hidden) gate-then-up and (E, hidden, I); the shared experts side by
    side as one MLP of width n_shared * I (a sum of SwiGLUs is one SwiGLU over the concatenated units)."""
    out, mlps = split_by_layer_mlp(state, "mlp.")
    for layer, mlp in mlps.items():
        prefix = f"{layer}block_sparse_moe."
        experts, shared = experts_of(mlp), experts_of(mlp, SHARED_KEY)
        out[prefix + "router.layer.weight"] = mlp["gate.weight"]
        out[prefix + "input_linear.weight"] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in experts])
        out[prefix + "output_linear.weight"] = torch.stack([e["down"] for e in experts])
        gates, ups = [e["gate"] for e in shared], [e["up"] for e in shared]
        out[f"{layer}shared_mlp.input_linear.weight"] = torch.cat(gates + ups)
        out[f"{layer}shared_mlp.output_linear.weight"] = torch.cat([e["down"] for e in shared], dim=1)
    return out


def from_granite(state, fields):
    rest, moes = split_by_layer_mlp(state, "block_sparse_moe.")
    out, shared_mlps = split_by_layer_mlp(rest, "shared_mlp.")
    width = fields["intermediate_size"]
    for layer, moe in moes.items():
        out[f"{layer}mlp.gate.weight"] = moe["router.layer.weight"]
        gate_up, down = moe["input_linear.weight"], moe["output_linear.weight"]
        for index in range(gate_up.shape[0]):
            expert = {"gate": gate_up[index, :width], "up": gate_up[index, width:], "down": down[index]}
            out.update({f"{layer}mlp.experts.{index}.{k}_proj.weight": v.contiguous() for k, v in expert.items()})
        shared = shared_mlps.get(layer, {})
        if shared:
            gates, ups = shared["input_linear.weight"].chunk(2)
            for index, (gate, up, down_part) in enumerate(zip(gates.split(width), ups.split(width),
                                                               shared["output_linear.weight"].split(width, dim=1))):
                part = {"gate": gate, "up": up, "down": down_part}
                out.update({f"{layer}mlp.shared_experts.{index}.{k}_proj.weight": v.contiguous() for k, v in part.items()})
    return out


def to_qwen2_moe(state, config):
    """Our names for the router and experts, plus Qwen2-MoE's shared expert as zeros: its output,
    sigmoid(gate) * down(silu(0) * 0), is exactly 0, so the block is the plain mixture."""
    out = same_names(state, config)
    hidden = config.hidden_size
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp."
        like = state[prefix + "gate.weight"]
        out[prefix + "shared_expert.gate_proj.weight"] = like.new_zeros(1, hidden)
        out[prefix + "shared_expert.up_proj.weight"] = like.new_zeros(1, hidden)
        out[prefix + "shared_expert.down_proj.weight"] = like.new_zeros(hidden, 1)
        out[prefix + "shared_expert_gate.weight"] = like.new_zeros(1, hidden)
    return out


def from_qwen2_moe(state, fields):
    out = {}
    for key, tensor in state.items():
        if ".mlp.shared_expert." in key:
            if torch.count_nonzero(tensor):
                raise CheckpointError(f"{key} is not zero: Qwen2-MoE's sigmoid-gated shared expert has no "
                                      "MiniMind equivalent (MiniMind's shared experts are not gated)")
        elif not key.endswith(".mlp.shared_expert_gate.weight"):
            out[key] = tensor
    return out


@dataclass(frozen=True)
class Layout:
    """A stock transformers layout: its model_type, class, config fields and weight names."""
    model_type: str
    architecture: str
    family: str  # the --to value that writes it
    fields: Callable  # MiniMindConfig -> its own config fields
    to_stock: Callable  # (our state dict, MiniMindConfig) -> its state dict
    from_stock: Callable  # (its state dict, config.json fields) -> our state dict


def from_same_names(state, fields):
    return dict(state)


LAYOUTS = {layout.model_type: layout for layout in (
    Layout("llama", "LlamaForCausalLM", "llama", llama_fields, same_names, from_same_names),
    Layout("mixtral", "MixtralForCausalLM", "llama", mixtral_fields, to_mixtral, from_mixtral),
    Layout("granitemoeshared", "GraniteMoeSharedForCausalLM", "llama", granite_fields, to_granite, from_granite),
    Layout("qwen2_moe", "Qwen2MoeForCausalLM", "llama", qwen2_moe_fields, to_qwen2_moe, from_qwen2_moe),
    Layout("qwen3", "Qwen3ForCausalLM", "qwen3", qwen3_fields, same_names, from_same_names),
    Layout("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3", qwen3_moe_fields, same_names, from_same_names),
)}


def choose_layout(config, state, family):
    """The stock layout of `family` ("llama" or "qwen3") that computes exactly what the model
    computes, or NotRepresentable saying which feature has none."""
    qk_norm = has_qk_norm(state)
    if family == "qwen3" and not qk_norm:
        raise NotRepresentable("--to qwen3: Qwen3 applies an RMSNorm to every query and key head, which this "
                               "model does not (an RMSNorm is not the identity, whatever its gain); use --to llama")
    if family == "llama" and qk_norm:
        raise NotRepresentable("--to llama: this model normalises each query and key head (q_norm, k_norm), "
                               "which Llama does not; use --to qwen3")
    if not config.use_moe:
        return LAYOUTS[family]
    shared, renormalised = config.n_shared_experts > 0, renormalises_top_k(config)
    if family == "qwen3":
        if shared:
            raise NotRepresentable("--to qwen3: Qwen3-MoE has no shared experts")
        return LAYOUTS["qwen3_moe"]
    if not shared:
        return LAYOUTS["mixtral" if renormalised else "qwen2_moe"]
    if renormalised:
        return LAYOUTS["granitemoeshared"]
    raise NotRepresentable(
        f"--to {family}: shared experts with unnormalised top-{config.num_experts_per_tok} router weights have no "
        "stock transformers layout (Qwen2-MoE gates its shared expert with a sigmoid, never exactly 1; "
        "GraniteMoeShared renormalises the top-k weights); --to gguf represents it exactly")


def stock_config(config, layout):
    """The config.json fields of `layout` for the model (model_type and architectures included)."""
    return {**common_fields(config), **layout.fields(config), "model_type": layout.model_type,
            "architectures": [layout.architecture]}


# ---------------------------------------------------------------- reading a stock layout back

def refuse(source, problem):
    raise CheckpointError(f"{source}: {problem}; MiniMind cannot represent it exactly")


def rope_fields(fields, source):
    """rope_theta, inference_rope_scaling, yarn_parameters from a stock rope description."""
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    theta = rope.get("rope_theta", fields.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", fields.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse(source, "partial rotary embeddings (partial_rotary_factor != 1)")
    if rope_type == "default":
        return {"rope_theta": theta, "inference_rope_scaling": False}
    yarn = fields.get("yarn_parameters")
    if rope_type != "longrope" or not fields.get("inference_rope_scaling") or not yarn:
        refuse(source, f"rope type '{rope_type}' (MiniMind has plain RoPE and the original's YaRN variant)")
    ours = MiniMindConfig(hidden_size=fields["hidden_size"], rope_theta=theta,
                          num_attention_heads=fields["num_attention_heads"], inference_rope_scaling=True,
                          max_position_embeddings=fields["max_position_embeddings"], yarn_parameters=yarn)
    divisors = rope_divisors(ours) or []
    same = (len(divisors) == len(rope["long_factor"]) and rope["long_factor"] == rope["short_factor"]
            and rope.get("attention_factor", 1.0) == 1.0
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(divisors, rope["long_factor"])))
    if not same:
        refuse(source, "longrope factors that are not MiniMind's YaRN variant")
    return {"rope_theta": theta, "inference_rope_scaling": True, "yarn_parameters": yarn}


def moe_fields(fields, source):
    """use_moe and the router/expert fields from a stock MoE config ({} for dense layouts)."""
    model_type = fields["model_type"]
    if model_type in ("llama", "qwen3"):
        return {}
    experts = fields.get("num_local_experts", fields.get("num_experts"))
    top_k = fields["num_experts_per_tok"]
    if model_type in ("mixtral", "granitemoeshared"):
        renormalised = True
    else:
        renormalised = bool(fields.get("norm_topk_prob"))
        if fields.get("decoder_sparse_step", 1) != 1 or fields.get("mlp_only_layers"):
            refuse(source, "dense layers between the MoE layers (decoder_sparse_step, mlp_only_layers)")
    if renormalised and top_k == 1:
        refuse(source, "a top-1 router renormalised to weight 1 (MiniMind weighs a single expert by its probability)")
    width = fields.get("moe_intermediate_size", fields["intermediate_size"])
    shared = fields.get("shared_intermediate_size", 0)
    if shared % width:
        refuse(source, f"a shared MLP of width {shared}, not a multiple of the expert width {width}")
    return {"use_moe": True, "n_routed_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": renormalised,
            "n_shared_experts": shared // width, "intermediate_size": width,
            "aux_loss_alpha": fields.get("router_aux_loss_coef", 0.1)}


def check_stock_features(fields, source):
    """Refuse features MiniMind lacks: biases, a head size of its own, windows, multipliers."""
    heads = fields["num_attention_heads"]
    qkv_bias = fields.get("qkv_bias", fields["model_type"] == "qwen2_moe")  # Qwen2-MoE's default is True
    if fields.get("attention_bias") or qkv_bias or fields.get("mlp_bias"):
        refuse(source, "bias terms in the attention or MLP projections")
    if fields.get("head_dim") not in (None, fields["hidden_size"] // heads) or fields["hidden_size"] % heads:
        refuse(source, f"head_dim {fields.get('head_dim')} != hidden_size / num_attention_heads")
    if fields.get("use_sliding_window") or (fields["model_type"] == "mixtral" and fields.get("sliding_window")):
        refuse(source, "sliding-window attention")
    if fields["model_type"] == "granitemoeshared":
        neutral = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                   "attention_multiplier": (fields["hidden_size"] // heads) ** -0.5}
        for name, value in neutral.items():
            if not math.isclose(fields.get(name, 1.0), value, rel_tol=1e-9):
                refuse(source, f"{name} {fields.get(name)} (MiniMind scales nothing)")


def minimind_config(fields, source, **overrides):
    """A MiniMindConfig from the config.json fields of a stock layout; CheckpointError when the
    checkpoint uses a feature MiniMind does not have."""
    model_type = fields.get("model_type")
    if model_type in ("qwen3", "qwen3_moe"):
        refuse(source, f"per-head q/k RMSNorm ({model_type})")
    check_stock_features(fields, source)
    ours = dict(
        hidden_size=fields["hidden_size"], num_hidden_layers=fields["num_hidden_layers"],
        num_attention_heads=fields["num_attention_heads"],
        num_key_value_heads=fields.get("num_key_value_heads") or fields["num_attention_heads"],
        intermediate_size=fields["intermediate_size"], vocab_size=fields["vocab_size"],
        max_position_embeddings=fields["max_position_embeddings"], rms_norm_eps=fields["rms_norm_eps"],
        hidden_act=fields.get("hidden_act", "silu"), bos_token_id=fields.get("bos_token_id"),
        eos_token_id=fields.get("eos_token_id"), pad_token_id=fields.get("pad_token_id") or 0, dropout=0.0,
    )
    ours.update(rope_fields(fields, source), **moe_fields(fields, source), **overrides)
    return MiniMindConfig(**ours)


def minimind_state_dict(state, fields):
    """Our weight names from a stock layout's."""
    return LAYOUTS[fields["model_type"]].from_stock(state, fields)
