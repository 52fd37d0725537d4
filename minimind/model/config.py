"""MiniMindConfig: the shape of a MiniMind model, of either family the original project released:
MiniMind2 (`model_family="minimind2"`, the default) or MiniMind-3 (`model_family="minimind3"`).
What differs between them, defaults included, is their entry in families.py.

A config.json without `model_family` is the family whose own fields it has (MiniMind-3 writes
head_dim, num_experts ...), else MiniMind2's. Fields left out (or None) take their family's default;
only num_key_value_heads=None means, as in both originals, one key/value head per query head. A
family's own names for fields (MiniMind-3's num_experts, router_aux_loss_coef) are accepted, and each
family's config.json is written with its own.
"""
from transformers import AutoConfig, PretrainedConfig

from .families import DEFAULT_FAMILY, FAMILIES, family_of_fields

FAMILY_DEFAULT = "family default"  # num_key_value_heads not given (None means one per query head)
RENAMED_FIELDS = {theirs: ours for family in FAMILIES.values() for ours, theirs in family.renamed_fields.items()}


def read_rope_scaling(kwargs, yarn_keys):
    """Pop the originals' `rope_scaling` (or `rope_parameters`) from kwargs; its YaRN numbers, or None.
    transformers 5 validates `rope_scaling` as its own RoPE schema, which the originals' YaRN
    variants do not follow, so we keep the numbers under our own name, yarn_parameters."""
    scaling = kwargs.pop("rope_scaling", None) or kwargs.pop("rope_parameters", None)
    kwargs.pop("rope_parameters", None)
    if isinstance(scaling, dict) and scaling.get("original_max_position_embeddings"):
        return {key: scaling[key] for key in yarn_keys if key in scaling}
    return None


def family_of_config(fields):
    """The family a config names, or that its given fields show (MiniMind2 when none do)."""
    return family_of_fields({name: value for name, value in fields.items() if value is not None}) or DEFAULT_FAMILY


def with_family_defaults(family, fields):
    """The config's fields, those left out (None) with the family's default or derived from the others."""
    fields = dict(fields, model_family=family.name)
    if fields["num_key_value_heads"] is None:  # plain multi-head attention, as in the originals
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    for name, default in family.defaults.items():
        if fields[name] is None or fields[name] == FAMILY_DEFAULT:
            fields[name] = default
    fields["intermediate_size"] = fields["intermediate_size"] or family.intermediate_size(fields["hidden_size"])
    # Its own field in MiniMind-3 (which rounds hidden / heads down); MiniMind2 derives it.
    fields["head_dim"] = fields["head_dim"] or fields["hidden_size"] // fields["num_attention_heads"]
    fields["yarn_parameters"] = {**family.yarn_parameters, **(fields["yarn_parameters"] or {})}
    fields["n_routed_experts"] = fields["n_routed_experts"] or 4
    # Width of each expert's SwiGLU (MiniMind-3's field; MiniMind2's experts are as wide as the dense FFN)
    fields["moe_intermediate_size"] = fields["moe_intermediate_size"] or fields["intermediate_size"]
    return fields


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"
    # One attribute per concept: a family's own names (MiniMind-3's) read and write ours.
    attribute_map = RENAMED_FIELDS

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
        num_key_value_heads: int = FAMILY_DEFAULT,
        head_dim: int = None,
        vocab_size: int = 6400,
        rms_norm_eps: float = None,
        # Per-head RMSNorm on queries and keys before the rotary embedding (MiniMind-3, as in Qwen3)
        qk_norm: bool = None,
        rope_theta: float = 1000000.0,
        inference_rope_scaling: bool = False,
        yarn_parameters: dict = None,
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
        initializer_range: float = 0.02,
        # Dropout on attention probabilities (None: the same as `dropout`, the original's behaviour).
        # On a CPU any value > 0 moves attention off the fused kernel and halves training speed.
        attention_dropout: float = None,
        **kwargs,
    ):
        fields = {name: value for name, value in locals().items() if name not in ("self", "kwargs", "__class__")}
        family = family_of_config({**kwargs, **fields})
        fields.update({RENAMED_FIELDS[name]: kwargs.pop(name) for name in list(kwargs) if name in RENAMED_FIELDS})
        legacy_yarn = read_rope_scaling(kwargs, family.yarn_parameters)
        if legacy_yarn:
            fields.update(inference_rope_scaling=True, yarn_parameters=legacy_yarn)
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("pad_token_id", 0)
        for name, value in with_family_defaults(family, fields).items():
            if name not in ("bos_token_id", "eos_token_id"):
                setattr(self, name, value)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def family(self):
        """The model's entry in families.FAMILIES."""
        return FAMILIES[self.model_family]

    @property
    def family_name(self):
        """'MiniMind2' or 'MiniMind-3', as the original project writes them."""
        return self.family.title

    def to_dict(self):
        """The fields as config.json holds them: under the family's own names, without the fields its
        config.json leaves out."""
        output = super().to_dict()
        family = FAMILIES.get(output.get("model_family"), DEFAULT_FAMILY)
        for ours, theirs in family.renamed_fields.items():
            output[theirs] = output.pop(ours)
        for name in family.absent_fields:
            output.pop(name, None)
        return output

    def check(self):
        """Raise a clear ValueError for shapes the architecture cannot build."""
        problems = []
        derived_head_dim = self.head_dim == self.hidden_size // self.num_attention_heads
        if not self.family.own_head_dim and derived_head_dim and self.hidden_size % self.num_attention_heads:
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
