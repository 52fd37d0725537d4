"""MiniMindConfig: the shape of a MiniMind model.

Field names and defaults are those of the original MiniMind2 code, so that its checkpoints and
config.json files load unchanged. The default is the 26M-parameter model: hidden 512, 8 layers,
8 query heads sharing 2 key/value heads, vocabulary 6400.
"""
import math

from transformers import AutoConfig, PretrainedConfig

# The YaRN variant of the original MiniMind: used when inference_rope_scaling is True and the
# position table is longer than the context the model was trained on.
DEFAULT_YARN_PARAMETERS = {
    "factor": 4,
    "beta_fast": 4,
    "beta_slow": 1,
    "original_max_position_embeddings": 2048,
}


def default_intermediate_size(hidden_size):
    """SwiGLU width: 8/3 of hidden (so the three matrices cost what a 4x MLP costs), rounded up to 64."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"

    def __init__(
        self,
        dropout: float = 0.0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        hidden_act: str = "silu",
        hidden_size: int = 512,
        intermediate_size: int = None,
        max_position_embeddings: int = 32768,
        num_attention_heads: int = 8,
        num_hidden_layers: int = 8,
        num_key_value_heads: int = 2,
        vocab_size: int = 6400,
        rms_norm_eps: float = 1e-05,
        rope_theta: float = 1000000.0,
        inference_rope_scaling: bool = False,
        flash_attn: bool = True,
        # Mixture of experts; ignored when use_moe is False.
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.1,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        yarn_parameters: dict = None,
        initializer_range: float = 0.02,
        attention_dropout: float = None,
        **kwargs,
    ):
        # transformers 5 validates `rope_scaling` as its own RoPE schema, which the original's
        # YaRN variant does not follow; take its numbers and keep them under our own name.
        legacy_scaling = kwargs.pop("rope_scaling", None) or kwargs.pop("rope_parameters", None)
        kwargs.pop("rope_parameters", None)
        if isinstance(legacy_scaling, dict) and legacy_scaling.get("original_max_position_embeddings"):
            inference_rope_scaling = True
            yarn_parameters = {k: legacy_scaling[k] for k in DEFAULT_YARN_PARAMETERS if k in legacy_scaling}
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("pad_token_id", 0)
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.inference_rope_scaling = inference_rope_scaling
        self.yarn_parameters = {**DEFAULT_YARN_PARAMETERS, **(yarn_parameters or {})}
        self.flash_attn = flash_attn
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        self.initializer_range = initializer_range
        # Dropout on attention probabilities (None: the same as `dropout`, the original's behaviour).
        # On a CPU any value > 0 moves attention off the fused kernel and halves training speed.
        self.attention_dropout = attention_dropout
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def check(self):
        """Raise a clear ValueError for shapes the architecture cannot build."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        elif self.head_dim % 2:
            problems.append(f"head dimension {self.head_dim} (hidden_size / num_attention_heads) must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            problems.append(f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and n_routed_experts {self.n_routed_experts}")
        if self.use_moe and self.scoring_func != "softmax":
            problems.append(f"scoring_func '{self.scoring_func}' is not supported (only 'softmax')")
        if problems:
            raise ValueError("invalid MiniMind config: " + "; ".join(problems))


# After this import, AutoConfig opens config.json files that say model_type "minimind"; and
# save_pretrained writes an auto_map with this file beside the weights, so that a process without
# minimind opens them with trust_remote_code=True.
AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
MiniMindConfig.register_for_auto_class()
