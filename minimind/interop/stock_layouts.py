"""MiniMind models in the stock layouts of transformers, and back.

A stock layout is a directory that `transformers` opens alone (no `import minimind`, no
`trust_remote_code`): a config.json whose model_type transformers knows, and weights under that
architecture's names. MiniMind2's dense decoder computes exactly what Llama computes (RMSNorm
normalising in float32 before the gain, rotate-half rotary embeddings, grouped-query attention,
SwiGLU, a tied lm_head), so its weights keep their names; MiniMind-3's, with per-head q/k norms
and a head_dim of its own, is Qwen3's. A mixture of experts maps to the stock layout whose router
computes the same weights:

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
    dense with per-head q/k norm            qwen3                  the same decoder
    MoE with per-head q/k norm,             qwen3_moe              softmax, top-k, renormalised
      no shared expert                                             per norm_topk_prob (k = 1 too)

"Renormalised" is each family's router rule (`families.renormalises_top_k`): MiniMind2's divides the top-k
weights by their sum when k > 1 and norm_topk_prob (with k = 1 the raw probability), MiniMind-3's
whenever norm_topk_prob (k = 1 then weighs 1). Shared experts with raw top-k weights have no stock
layout (Qwen2-MoE gates its shared expert with a sigmoid, which is never exactly 1;
GraniteMoeShared always renormalises): `choose_layout` refuses them in one line.

RoPE scaling is written in the stock form that transformers' own rope code turns into our table
(`rope_parameters`, checked by `same_rotary`): MiniMind-3's YaRN is transformers' `yarn` (the same
NTK-by-parts formula, attention_factor written out); MiniMind2's ramps differently, and `longrope`
with equal short and long factors applies any per-pair factors. The YaRN parameters are kept in
the config too, so that reading it back restores them.

Reading back (`minimind_config`, `minimind_state_dict`) accepts what `export` writes and any
checkpoint of these layouts whose features MiniMind has (Qwen3 and Qwen3-MoE as MiniMind-3, the
others as MiniMind2); anything else is refused with the feature that is missing.
"""
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CheckpointError, UserError
from ..model.config import MiniMindConfig
from ..model.families import family_of_stock, has_qk_norm, renormalises_top_k
from ..model.model import rotary_frequencies

TIED_KEY = "lm_head.weight"


class NotRepresentable(UserError):
    """The model computes something the requested layout cannot express exactly."""


# ---------------------------------------------------------------- what the model computes

def yarn_of(config):
    """The YaRN parameters the model's rotary table uses, or None (RotaryEmbedding.tables' choice)."""
    return config.yarn_parameters if config.inference_rope_scaling else None


def rotary_of(config):
    """(f_i, the (head_dim / 2,) angles per position, and the factor on cos and sin) that the model's
    rotary table uses: its family's YaRN when on (precompute_rotary_frequencies)."""
    yarn = yarn_of(config)
    freqs = rotary_frequencies(config.head_dim, config.max_position_embeddings, config.rope_theta, yarn,
                               config.family.yarn)
    return freqs, float((yarn or {}).get("attention_factor", 1.0))


def rope_divisors(config):
    """Per-pair divisors of the plain rotary frequencies, (head_dim / 2) floats, or None when the
    model uses plain RoPE (YaRN off, or a table that fits the training context)."""
    plain, (scaled, _) = rotary_frequencies(config.head_dim, 1, config.rope_theta), rotary_of(config)
    if torch.equal(plain, scaled):
        return None
    return (plain.double() / scaled.double()).tolist()


def plain_rope(config):
    """Whether the rotary table is plain RoPE: no per-pair scaling and no factor on cos and sin."""
    return rope_divisors(config) is None and rotary_of(config)[1] == 1.0


@contextmanager
def quiet_transformers():
    """transformers' warnings silenced (its config checks warn about the rope dicts we only probe)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def stock_rotary(rope, head_dim, max_position_embeddings):
    """(inverse frequencies (head_dim / 2,), factor on cos and sin) that transformers computes for a
    rope_parameters dict: its own code, so that what we write is checked against what it runs."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    with quiet_transformers():
        config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                             max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope))
        freqs, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    return freqs, float(scale)


def same_rotary(config, rope):
    """Whether transformers' `rope` gives the model's rotary table (float32 rounding apart: 1e-6)."""
    ours, our_scale = rotary_of(config)
    theirs, their_scale = stock_rotary(rope, config.head_dim, config.max_position_embeddings)
    return (theirs.shape == ours.shape and math.isclose(our_scale, their_scale, rel_tol=1e-6)
            and torch.allclose(theirs.double(), ours.double(), rtol=1e-6, atol=0.0))


# ---------------------------------------------------------------- config.json of each layout

def rope_parameters(config, target="the export"):
    """transformers' rope_parameters for the model: default for plain RoPE; else `yarn` when
    transformers' YaRN computes our table (MiniMind-3's is the same NTK-by-parts formula), else
    `longrope` with our per-pair divisors (MiniMind2's ramp has no other stock form). Each is
    checked against transformers' own rope code; NotRepresentable if neither gives our table."""
    theta = float(config.rope_theta)
    if plain_rope(config):
        return {"rope_type": "default", "rope_theta": theta}
    yarn, (_, scale) = yarn_of(config), rotary_of(config)
    original = yarn["original_max_position_embeddings"]
    divisors = rope_divisors(config) or [1.0] * (config.head_dim // 2)
    candidates = [
        {"rope_type": "yarn", "rope_theta": theta, "factor": float(yarn["factor"]),
         "beta_fast": float(yarn["beta_fast"]), "beta_slow": float(yarn["beta_slow"]),
         "original_max_position_embeddings": original, "attention_factor": scale},
        {"rope_type": "longrope", "rope_theta": theta, "short_factor": divisors, "long_factor": divisors,
         "attention_factor": scale, "original_max_position_embeddings": original,
         "factor": config.max_position_embeddings / original},
    ]
    for rope in candidates:
        if same_rotary(config, rope):
            return rope
    raise NotRepresentable(f"{target}: no transformers rope type (yarn, longrope) reproduces this model's "
                           f"{config.family_name} YaRN table")


def common_fields(config, target):
    """What every layout shares: sizes, norm epsilon, RoPE, the tied embedding, special token ids."""
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters(config, target), tie_word_embeddings=True, attention_dropout=0.0,
        initializer_range=config.initializer_range, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    if fields["rope_parameters"]["rope_type"] != "default":
        # not read by transformers; lets load_model restore the YaRN parameters exactly
        fields.update(inference_rope_scaling=True, yarn_parameters=dict(config.yarn_parameters))
    return fields


def llama_fields(config):
    return dict(head_dim=config.head_dim, attention_bias=False, mlp_bias=False)


def mixtral_fields(config):
    return dict(head_dim=config.head_dim, intermediate_size=config.moe_intermediate_size,
                num_local_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                router_aux_loss_coef=config.aux_loss_alpha, sliding_window=None)


def granite_fields(config):
    return dict(intermediate_size=config.moe_intermediate_size, num_local_experts=config.n_routed_experts,
                num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.aux_loss_alpha,
                attention_bias=False,
                shared_intermediate_size=config.n_shared_experts * config.intermediate_size,
                embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
                attention_multiplier=config.head_dim ** -0.5)


def qwen2_moe_fields(config):
    return dict(num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=renormalises_top_k(config),
                shared_expert_intermediate_size=1, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                use_sliding_window=False, router_aux_loss_coef=config.aux_loss_alpha)


def qwen3_fields(config):
    return dict(head_dim=config.head_dim, attention_bias=False, use_sliding_window=False)


def qwen3_moe_fields(config):
    return dict(qwen3_fields(config), num_experts=config.n_routed_experts,
                num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
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


def from_qwen3(state, fields):
    """Qwen3's names are ours; its per-head q/k norm gains must be there (they make it Qwen3)."""
    if not has_qk_norm(state):
        raise CheckpointError(f"a {fields['model_type']} checkpoint without per-head q/k norm weights "
                              "(self_attn.q_norm.weight)")
    return dict(state)


LAYOUTS = {layout.model_type: layout for layout in (
    Layout("llama", "LlamaForCausalLM", "llama", llama_fields, same_names, from_same_names),
    Layout("mixtral", "MixtralForCausalLM", "llama", mixtral_fields, to_mixtral, from_mixtral),
    Layout("granitemoeshared", "GraniteMoeSharedForCausalLM", "llama", granite_fields, to_granite, from_granite),
    Layout("qwen2_moe", "Qwen2MoeForCausalLM", "llama", qwen2_moe_fields, to_qwen2_moe, from_qwen2_moe),
    Layout("qwen3", "Qwen3ForCausalLM", "qwen3", qwen3_fields, same_names, from_qwen3),
    Layout("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3", qwen3_moe_fields, same_names, from_qwen3),
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
    return {**common_fields(config, f"--to {layout.family}"), **layout.fields(config), "model_type": layout.model_type,
            "architectures": [layout.architecture]}


# ---------------------------------------------------------------- reading a stock layout back

def refuse(source, problem):
    raise CheckpointError(f"{source}: {problem}; MiniMind cannot represent it exactly")


def family_of_layout(model_type):
    """The MiniMind family a stock layout reads back as (families.Family.stock): MiniMind-3 for
    Qwen3's (per-head q/k norms, a top-1 router that may renormalise to weight 1, its YaRN),
    MiniMind2 for the Llama family."""
    return family_of_stock(LAYOUTS[model_type].family)


def stock_default(model_type, name):
    """transformers' default for a field that a config.json leaves out (Qwen3's head_dim is 128, not
    hidden_size / num_attention_heads)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(model_type), name)


def attention_fields(fields, family):
    """hidden_size, head counts and (a family that has the field: MiniMind-3) head_dim of a stock config."""
    heads = fields["num_attention_heads"]
    ours = dict(hidden_size=fields["hidden_size"], num_attention_heads=heads,
                num_key_value_heads=fields.get("num_key_value_heads") or heads)
    if family.own_head_dim:
        ours["head_dim"] = fields.get("head_dim") or stock_default(fields["model_type"], "head_dim")
    return ours


def yarn_of_stock(rope, head_dim, max_position_embeddings):
    """A stock `yarn` rope dict as MiniMind-3's yarn_parameters (the same NTK-by-parts formula; its
    attention factor, when the dict leaves it out, is the one transformers derives from the factor)."""
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    rope["original_max_position_embeddings"] = original
    return {"factor": rope.get("factor") or max_position_embeddings / original,
            "beta_fast": rope.get("beta_fast") or 32, "beta_slow": rope.get("beta_slow") or 1,
            "original_max_position_embeddings": original,
            "attention_factor": stock_rotary(rope, head_dim, max_position_embeddings)[1]}


def rope_fields(fields, source, shape):
    """rope_theta, inference_rope_scaling, yarn_parameters from a stock rope description: the YaRN
    parameters export wrote beside it, or a stock `yarn` read as MiniMind-3's; accepted only when
    the family's table equals what transformers computes for the file (same_rotary).
    shape: model_family, hidden_size, num_attention_heads, head_dim (MiniMind-3), max_position_embeddings."""
    rope = dict(fields.get("rope_parameters") or fields.get("rope_scaling") or {})
    theta = rope.get("rope_theta", fields.get("rope_theta", 10000.0))
    rope_type = rope.pop("type", None) or rope.get("rope_type", "default")
    if rope.get("partial_rotary_factor", fields.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse(source, "partial rotary embeddings (partial_rotary_factor != 1)")
    if rope_type == "default":
        return {"rope_theta": theta, "inference_rope_scaling": False}
    rope.update(rope_type=rope_type, rope_theta=theta)
    ours = MiniMindConfig(**shape, rope_theta=theta)
    yarn = fields.get("yarn_parameters") if fields.get("inference_rope_scaling") else None
    if yarn is None and rope_type == "yarn" and ours.family.yarn == "ntk-by-parts":  # transformers' yarn formula
        yarn = yarn_of_stock(rope, ours.head_dim, ours.max_position_embeddings)
    if yarn is not None:
        ours = MiniMindConfig(**shape, rope_theta=theta, inference_rope_scaling=True, yarn_parameters=yarn)
    if yarn is None or rope_type not in ("yarn", "longrope") or not same_rotary(ours, rope):
        refuse(source, f"rope type '{rope_type}' with these parameters (MiniMind has plain RoPE and the "
                       f"{ours.family_name} YaRN)")
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
    if renormalised and top_k == 1 and not family_of_layout(model_type).renormalises_single_expert:
        refuse(source, "a top-1 router renormalised to weight 1 (MiniMind2 weighs a single expert by its "
                       "probability; MiniMind-3's router, read from Qwen3-MoE, renormalises)")
    width = fields.get("moe_intermediate_size", fields["intermediate_size"])
    shared = fields.get("shared_intermediate_size", 0)
    if shared % width:
        refuse(source, f"a shared MLP of width {shared}, not a multiple of the expert width {width}")
    # MiniMind-3 (Qwen3-MoE) keeps its dense width beside the experts'; MiniMind2's experts are as wide
    expert_width = "moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"
    return {"use_moe": True, "n_routed_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": renormalised,
            "n_shared_experts": shared // width, expert_width: width,
            "aux_loss_alpha": fields.get("router_aux_loss_coef", 0.1)}


def check_stock_features(fields, source, family):
    """Refuse features MiniMind lacks: biases, a head size of its own (MiniMind2), sliding windows,
    multipliers."""
    heads = fields["num_attention_heads"]
    qkv_bias = fields.get("qkv_bias", fields["model_type"] == "qwen2_moe")  # Qwen2-MoE's default is True
    if fields.get("attention_bias") or qkv_bias or fields.get("mlp_bias"):
        refuse(source, "bias terms in the attention or MLP projections")
    if not family.own_head_dim and (fields.get("head_dim") not in (None, fields["hidden_size"] // heads)
                                  or fields["hidden_size"] % heads):
        refuse(source, f"head_dim {fields.get('head_dim')} != hidden_size / num_attention_heads")
    if (fields.get("use_sliding_window") or "sliding_attention" in (fields.get("layer_types") or [])
            or (fields["model_type"] == "mixtral" and fields.get("sliding_window"))):
        refuse(source, "sliding-window attention")
    if fields["model_type"] == "granitemoeshared":
        neutral = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                   "attention_multiplier": (fields["hidden_size"] // heads) ** -0.5}
        for name, value in neutral.items():
            if not math.isclose(fields.get(name, 1.0), value, rel_tol=1e-9):
                refuse(source, f"{name} {fields.get(name)} (MiniMind scales nothing)")


def minimind_config(fields, source, **overrides):
    """A MiniMindConfig from the config.json fields of a stock layout (MiniMind-3 for Qwen3 and
    Qwen3-MoE, MiniMind2 otherwise); CheckpointError when the checkpoint uses a feature MiniMind
    does not have."""
    family = family_of_layout(fields["model_type"])
    check_stock_features(fields, source, family)
    shape = dict(model_family=family.name, max_position_embeddings=fields["max_position_embeddings"],
                 **attention_fields(fields, family))
    ours = dict(
        shape, num_hidden_layers=fields["num_hidden_layers"], intermediate_size=fields["intermediate_size"],
        vocab_size=fields["vocab_size"], rms_norm_eps=fields["rms_norm_eps"],
        hidden_act=fields.get("hidden_act", "silu"), bos_token_id=fields.get("bos_token_id"),
        eos_token_id=fields.get("eos_token_id"), pad_token_id=fields.get("pad_token_id") or 0, dropout=0.0,
    )
    shape.pop("num_key_value_heads")
    ours.update(rope_fields(fields, source, shape), **moe_fields(fields, source), **overrides)
    return MiniMindConfig(**ours)


def minimind_state_dict(state, fields):
    """Our weight names from a stock layout's."""
    return LAYOUTS[fields["model_type"]].from_stock(state, fields)
