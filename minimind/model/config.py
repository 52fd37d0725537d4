"""MiniMindConfig: the shape of a MiniMind model, of either family the original project released.

- MiniMind2 (`model_family="minimind2"`, the default): field names and defaults of the original
  MiniMind2 code, so that its checkpoints and config.json files load unchanged. The default is the
  26M-parameter model: hidden 512, 8 layers, 8 query heads sharing 2 key/value heads, vocabulary 6400.
- MiniMind-3 (`model_family="minimind3"`): the original's current release family. Per-head RMSNorm
  on queries and keys (`qk_norm`), 4 key/value heads, a SwiGLU width of ceil(h·π/64)·64, eps 1e-6,
  hidden 768; its mixture of experts has no shared expert and a Switch-style balance loss; its
  YaRN is another formula. Its config.json names two MoE fields differently (`num_experts`,
  `router_aux_loss_coef`): both names are accepted, and each family's file is written with its own.

A config.json without `model_family` is MiniMind-3's when it has a field only that code writes
(MINIMIND3_ONLY_FIELDS), else MiniMind2's. Fields left out (or None) take their family's default;
only num_key_value_heads=None means, as in both originals, one key/value head per query head.
"""
import math

from transformers import AutoConfig, PretrainedConfig

FAMILIES = ("minimind2", "minimind3")
FAMILY_NAMES = {"minimind2": "MiniMind2", "minimind3": "MiniMind-3"}

# The YaRN variant of the original MiniMind2: used when inference_rope_scaling is True and the
# position table is longer than the context the model was trained on.
DEFAULT_YARN_PARAMETERS = {
    "factor": 4,
    "beta_fast": 4,
    "beta_slow": 1,
    "original_max_position_embeddings": 2048,
}
# MiniMind-3's YaRN (another formula, model.minimind3_yarn_scale), with its numbers.
MINIMIND3_YARN_PARAMETERS = {
    "factor": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "original_max_position_embeddings": 2048,
    "attention_factor": 1.0,
}

# Fields that the MiniMind-3 code always writes into a config.json and MiniMind2's never does.
MINIMIND3_ONLY_FIELDS = ("head_dim", "num_experts", "moe_intermediate_size", "router_aux_loss_coef")
# MiniMind-3's names for fields MiniMind2 already had (ours -> theirs); both are read and written.
MINIMIND3_NAMES = {"n_routed_experts": "num_experts", "aux_loss_alpha": "router_aux_loss_coef"}
# MiniMind2-only fields that a MiniMind-3 config.json leaves out (its router has no sequence-level loss).
MINIMIND2_ONLY_FIELDS = ("seq_aux", "scoring_func")


def default_intermediate_size(hidden_size):
    """MiniMind2's SwiGLU width: 8/3 of hidden (so the three matrices cost what a 4x MLP costs), rounded up to 64."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


def minimind3_intermediate_size(hidden_size):
    """MiniMind-3's SwiGLU width: pi times hidden, rounded up to 64 (2432 for hidden 768): wider than 8/3."""
    return 64 * math.ceil(hidden_size * math.pi / 64)


FAMILY_DEFAULTS = {
    "minimind2": {"hidden_size": 512, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "qk_norm": False,
                  "num_experts_per_tok": 2, "n_shared_experts": 1, "aux_loss_alpha": 0.1,
                  "yarn_parameters": DEFAULT_YARN_PARAMETERS, "intermediate_size": default_intermediate_size},
    "minimind3": {"hidden_size": 768, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "qk_norm": True,
                  "num_experts_per_tok": 1, "n_shared_experts": 0, "aux_loss_alpha": 5e-4,
                  "yarn_parameters": MINIMIND3_YARN_PARAMETERS, "intermediate_size": minimind3_intermediate_size},
}


def read_rope_scaling(kwargs, yarn_keys):
    """Pop the originals' `rope_scaling` (or `rope_parameters`) from kwargs; its YaRN numbers, or None.
    transformers 5 validates `rope_scaling` as its own RoPE schema, which the originals' YaRN
    variants do not follow, so we keep the numbers under our own name, yarn_parameters."""
    scaling = kwargs.pop("rope_scaling", None) or kwargs.pop("rope_parameters", None)
    kwargs.pop("rope_parameters", None)
    if isinstance(scaling, dict) and scaling.get("original_max_position_embeddings"):
        return {key: scaling[key] for key in yarn_keys if key in scaling}
    return None


def detect_family(fields):
    """'minimind3' or 'minimind2' for a dict of config fields (a config.json): its `model_family`,
    else MiniMind-3 when it has a field only that code writes."""
    family = fields.get("model_family")
    if family is not None:
        return family
    return "minimind3" if any(name in fields for name in MINIMIND3_ONLY_FIELDS) else "minimind2"


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"
    # One attribute per concept: MiniMind-3's names read and write MiniMind2's attributes.
    attribute_map = {theirs: ours for ours, theirs in MINIMIND3_NAMES.items()}

    def __init__(
        self,
        model_family: str = None,
        dropout: float = 0.0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        hidden_act: str = "silu",
        hidden_size: int = None,
        intermediate_size: int = None,
        max_position_embeddings: int = 32768,
        num_attention_heads: int = 8,
        num_hidden_layers: int = 8,
        num_key_value_heads: int = "family default",
        head_dim: int = None,
        vocab_size: int = 6400,
        rms_norm_eps: float = None,
        qk_norm: bool = None,
        rope_theta: float = 1000000.0,
        inference_rope_scaling: bool = False,
        flash_attn: bool = True,
        # Mixture of experts; ignored when use_moe is False.
        use_moe: bool = False,
        num_experts_per_tok: int = None,
        n_routed_experts: int = None,
        n_shared_experts: int = None,
        moe_intermediate_size: int = None,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = None,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        yarn_parameters: dict = None,
        initializer_range: float = 0.02,
        attention_dropout: float = None,
        **kwargs,
    ):
        named = {"head_dim": head_dim, "moe_intermediate_size": moe_intermediate_size}
        family = model_family or detect_family({**kwargs, **{k: v for k, v in named.items() if v is not None}})
        if family not in FAMILIES:
            raise ValueError(f"invalid MiniMind config: model_family '{family}' is not one of {', '.join(FAMILIES)}")
        defaults = FAMILY_DEFAULTS[family]
        legacy_yarn = read_rope_scaling(kwargs, defaults["yarn_parameters"])
        if legacy_yarn:
            inference_rope_scaling, yarn_parameters = True, legacy_yarn
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("pad_token_id", 0)
        self.model_family = family
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.hidden_size = hidden_size or defaults["hidden_size"]
        self.intermediate_size = intermediate_size or defaults["intermediate_size"](self.hidden_size)
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        if num_key_value_heads == "family default":
            num_key_value_heads = defaults["num_key_value_heads"]
        # None: one key/value head per query head (plain multi-head attention), as in the originals
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        # Its own field in MiniMind-3 (which rounds hidden / heads down); MiniMind2 derives it.
        self.head_dim = head_dim or self.hidden_size // num_attention_heads
        self.vocab_size = vocab_size
        self.rms_norm_eps = defaults["rms_norm_eps"] if rms_norm_eps is None else rms_norm_eps
        # Per-head RMSNorm on queries and keys before the rotary embedding (MiniMind-3, as in Qwen3)
        self.qk_norm = defaults["qk_norm"] if qk_norm is None else qk_norm
        self.rope_theta = rope_theta
        self.inference_rope_scaling = inference_rope_scaling
        self.yarn_parameters = {**defaults["yarn_parameters"], **(yarn_parameters or {})}
        self.flash_attn = flash_attn
        self.set_mixture_of_experts(defaults, kwargs, use_moe, num_experts_per_tok, n_routed_experts,
                                    n_shared_experts, moe_intermediate_size, scoring_func, aux_loss_alpha, seq_aux,
                                    norm_topk_prob)
        self.initializer_range = initializer_range
        # Dropout on attention probabilities (None: the same as `dropout`, the original's behaviour).
        # On a CPU any value > 0 moves attention off the fused kernel and halves training speed.
        self.attention_dropout = attention_dropout
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    def set_mixture_of_experts(self, defaults, kwargs, use_moe, num_experts_per_tok, n_routed_experts,
                               n_shared_experts, moe_intermediate_size, scoring_func, aux_loss_alpha, seq_aux,
                               norm_topk_prob):
        """The MoE fields (ignored when use_moe is False); MiniMind-3's names popped from kwargs."""
        n_routed_experts = kwargs.pop("num_experts", n_routed_experts)
        aux_loss_alpha = kwargs.pop("router_aux_loss_coef", aux_loss_alpha)
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok or defaults["num_experts_per_tok"]
        self.n_routed_experts = n_routed_experts or 4
        self.n_shared_experts = defaults["n_shared_experts"] if n_shared_experts is None else n_shared_experts
        # Width of each expert's SwiGLU (MiniMind-3's field; MiniMind2's experts are as wide as the dense FFN)
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
        self.scoring_func = scoring_func
        self.aux_loss_alpha = defaults["aux_loss_alpha"] if aux_loss_alpha is None else aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob

    @property
    def family_name(self):
        """'MiniMind2' or 'MiniMind-3', as the original project writes them."""
        return FAMILY_NAMES[self.model_family]

    def to_dict(self):
        """The fields as config.json holds them: a MiniMind-3 config with MiniMind-3's names."""
        output = super().to_dict()
        if output.get("model_family") == "minimind3":
            for ours, theirs in MINIMIND3_NAMES.items():
                output[theirs] = output.pop(ours)
            for name in MINIMIND2_ONLY_FIELDS:
                output.pop(name, None)
        return output

    def check(self):
        """Raise a clear ValueError for shapes the architecture cannot build."""
        problems = []
        derived_head_dim = self.head_dim == self.hidden_size // self.num_attention_heads
        if self.model_family == "minimind2" and derived_head_dim and self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        elif self.head_dim % 2:
            problems.append(f"head dimension {self.head_dim} (hidden_size / num_attention_heads, or head_dim) must "
                            f"be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            problems.append(f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and the number of "
                            f"experts {self.n_routed_experts}")
        if self.use_moe and self.scoring_func != "softmax":
            problems.append(f"scoring_func '{self.scoring_func}' is not supported (only 'softmax')")
        if problems:
            raise ValueError("invalid MiniMind config: " + "; ".join(problems))


# After this import, AutoConfig opens config.json files that say model_type "minimind"; and
# save_pretrained writes an auto_map with this file beside the weights, so that a process without
# minimind opens them with trust_remote_code=True.
AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
MiniMindConfig.register_for_auto_class()
