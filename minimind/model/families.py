"""The model families of the original MiniMind project, one entry each, which the rest of minimind reads.

- MiniMind2 (the default): field names and defaults of the original MiniMind2 code, so that its
  checkpoints and config.json files load unchanged; the 26M-parameter model is hidden 512, 8 layers,
  8 query heads sharing 2 key/value heads, vocabulary 6400.
- MiniMind-3: the original's current release family. Per-head RMSNorm on queries and keys, 4
  key/value heads, a SwiGLU width of ceil(h·π/64)·64, eps 1e-6, hidden 768; its mixture of experts
  has no shared expert and a Switch-style balance loss; its YaRN is another formula. Its
  config.json names two MoE fields differently (num_experts, router_aux_loss_coef).

An entry says what differs between families, for each part of minimind that needs to know:
- the config (config.py): the defaults of fields left out, how its config.json names and leaves out
  fields, and the fields only its code writes, which tell a config.json of the family;
- the model (model.py): the order of the RMSNorm's multiply, the YaRN formula, the router, the q/k
  norms (a default of the config), a head_dim of its own;
- loading (checkpoint.py): how its tensors show it (q/k norm weights, has_qk_norm) and which field
  holds a routed expert's width;
- export (interop/): the stock transformers layouts it is written as (--to) and read back from. A
  GGUF file's llama.cpp graph follows the same split (the Llama graphs, or Qwen3's for q/k norms).

Adding a family is one entry in FAMILIES, and model.py's code for a YaRN formula or a router that
no family had before (YARN_SCALES, ROUTERS). Plain Python: config.py imports it, so it is copied
beside saved weights for trust_remote_code, and `train --help` reads the family names.
"""
import math
from dataclasses import dataclass, field
from typing import Callable


def minimind2_intermediate_size(hidden_size):
    """MiniMind2's SwiGLU width: 8/3 of hidden (so the three matrices cost what a 4x MLP costs), rounded up to 64."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


def minimind3_intermediate_size(hidden_size):
    """MiniMind-3's SwiGLU width: pi times hidden, rounded up to 64 (2432 for hidden 768): wider than 8/3."""
    return 64 * math.ceil(hidden_size * math.pi / 64)


@dataclass(frozen=True)
class Family:
    name: str                   # config.model_family
    title: str                  # as the original project writes it
    defaults: dict              # config fields left out (or None) take these
    intermediate_size: Callable  # hidden_size -> the SwiGLU width, when not given
    yarn_parameters: dict       # the YaRN numbers of its long-context variant (inference_rope_scaling)
    # config.json
    own_fields: tuple = ()      # fields only this family's code writes: a config.json that has one is this family's
    renamed_fields: dict = field(default_factory=dict)  # our field -> its name in this family's config.json
    absent_fields: tuple = ()   # our fields that this family's config.json leaves out
    # the model
    norm_weight_in_float32: bool = False  # RMSNorm multiplies by its weight before casting back (else after)
    yarn: str = "ramp"          # its YaRN formula (model.YARN_SCALES)
    router: str = "deepseek"    # its MoE router (model.ROUTERS)
    own_head_dim: bool = False  # head_dim is a field of its own (else hidden_size / heads, which must divide)
    # loading and export
    expert_width: str = "intermediate_size"  # the config field that holds a routed expert's width
    stock: str = "llama"        # the stock layouts (--to) it is exported as and read back from

    @property
    def renormalises_single_expert(self):
        """Whether a top-1 router weighs its expert 1 (renormalised) rather than by its probability."""
        return self.router == "switch"


MINIMIND2 = Family(
    "minimind2", "MiniMind2",
    defaults={"hidden_size": 512, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "qk_norm": False,
              "num_experts_per_tok": 2, "n_shared_experts": 1, "aux_loss_alpha": 0.1},
    intermediate_size=minimind2_intermediate_size,
    # used when inference_rope_scaling is on and the position table is longer than the training context
    yarn_parameters={"factor": 4, "beta_fast": 4, "beta_slow": 1, "original_max_position_embeddings": 2048},
)
MINIMIND3 = Family(
    "minimind3", "MiniMind-3",
    defaults={"hidden_size": 768, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "qk_norm": True,
              "num_experts_per_tok": 1, "n_shared_experts": 0, "aux_loss_alpha": 5e-4},
    intermediate_size=minimind3_intermediate_size,
    yarn_parameters={"factor": 16, "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 2048,
                     "attention_factor": 1.0},
    own_fields=("head_dim", "num_experts", "moe_intermediate_size", "router_aux_loss_coef"),
    renamed_fields={"n_routed_experts": "num_experts", "aux_loss_alpha": "router_aux_loss_coef"},
    absent_fields=("seq_aux", "scoring_func"),  # its router has no sequence-level loss
    norm_weight_in_float32=True, yarn="ntk-by-parts", router="switch", own_head_dim=True,
    expert_width="moe_intermediate_size", stock="qwen3",
)
FAMILIES = {family.name: family for family in (MINIMIND2, MINIMIND3)}
DEFAULT_FAMILY = MINIMIND2


def family_of_fields(fields):
    """The family a dict of config fields (a config.json) names (model_family), or that its fields
    show (a field only that family's code writes); None when neither tells."""
    name = fields.get("model_family")
    if name is not None and name not in FAMILIES:
        raise ValueError(f"invalid MiniMind config: model_family '{name}' is not one of {', '.join(FAMILIES)}")
    if name is not None:
        return FAMILIES[name]
    return next((family for family in FAMILIES.values() if any(name in fields for name in family.own_fields)), None)


def has_qk_norm(state):
    """Whether the weights carry per-head q/k RMSNorm gains (`self_attn.q_norm.weight`)."""
    return any(key.endswith("self_attn.q_norm.weight") for key in state)


def family_of_weights(state):
    """The family whose models have the q/k norms the tensors have (or have not)."""
    qk_norm = has_qk_norm(state)
    return next(family for family in FAMILIES.values() if family.defaults["qk_norm"] == qk_norm)


def family_of_stock(stock):
    """The family that the stock layouts of `stock` ("llama", "qwen3") read back as."""
    return next(family for family in FAMILIES.values() if family.stock == stock)


def renormalises_top_k(config):
    """Whether the router's top-k weights sum to 1, as the config's family's router decides: when
    norm_topk_prob and k > 1, or also for k = 1 where the family renormalises a single expert
    (MiniMind-3: it then weighs 1; MiniMind2 keeps its probability)."""
    single = FAMILIES[config.model_family].renormalises_single_expert
    return bool(config.norm_topk_prob) and (config.num_experts_per_tok > 1 or single)
