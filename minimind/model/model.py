"""The MiniMind model, in the order data flows through it.

    token ids -> embedding -> N x [RMSNorm -> attention (+ residual) -> RMSNorm -> feed-forward (+ residual)]
              -> RMSNorm -> lm_head (tied to the embedding) -> logits over the vocabulary

A Llama-style decoder: RMSNorm instead of LayerNorm, rotary position embeddings (with the YaRN
variant for long contexts), grouped-query attention with a key/value cache, a SwiGLU feed-forward or
a mixture of SwiGLU experts. Parameter names are those of the original MiniMind code (which are
also Llama's), so its checkpoints load unchanged.

Both families of the original project are built here; where they differ, the config's family entry
(families.py) picks: MiniMind-3 adds per-head RMSNorms on queries and keys (`qk_norm`), scales its
norms in float32 (`family_norm`), has its own YaRN formula (`ntk_by_parts_yarn_scale`) and its own
router (`MiniMind3Gate`: renormalised top-k, a Switch-style balance loss, no shared experts).

Shapes: B batch, S new tokens, K keys (cached + new), H query heads, G key/value heads, D head dim.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import MiniMindConfig
from .kernels import IGNORE_INDEX, next_token_loss, next_token_losses, output_weight, rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32.

    Unlike LayerNorm it neither subtracts the mean nor adds a bias: rescaling alone keeps the
    residual stream stable and costs one reduction instead of two. The arithmetic lives in
    kernels.rms_norm, whose hand-written backward saves memory passes in training.
    """

    def __init__(self, dim, eps=1e-5, scale_in_float32=False):
        super().__init__()
        self.eps = eps
        # MiniMind-3 multiplies by the weight before casting back to x's dtype, MiniMind2 after
        # (equal in float32, a rounding apart in bfloat16 / float16).
        self.scale_in_float32 = scale_in_float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.scale_in_float32)


def family_norm(config, dim):
    """An RMSNorm of width `dim` with the config's eps, rounding in its family's order."""
    return RMSNorm(dim, eps=config.rms_norm_eps, scale_in_float32=config.family.norm_weight_in_float32)


def ramp_yarn_scale(freqs, yarn, rope_theta):
    """The original MiniMind2's YaRN: pairs whose wavelength fits in the training context are scaled
    by (b*s - b + 1)/(b*s), with b ramping from beta_slow to beta_fast across pairs and s the factor;
    the slower pairs by 1/s."""
    half = freqs.shape[0]
    original_max, factor = yarn["original_max_position_embeddings"], yarn["factor"]
    beta_fast, beta_slow = yarn["beta_fast"], yarn["beta_slow"]
    # first pair whose wavelength 2*pi/f exceeds the training context
    corr_dim = next((i for i in range(half) if 2 * math.pi / freqs[i] > original_max), half)
    ramp = torch.arange(0, half, device=freqs.device).float() / max(half - 1, 1)
    beta = beta_slow + (beta_fast - beta_slow) * ramp
    scale = torch.where(torch.arange(half, device=freqs.device) < corr_dim, (beta * factor - beta + 1) / (beta * factor),
                        1.0 / factor)
    return freqs * scale


def ntk_by_parts_yarn_scale(freqs, yarn, rope_theta):
    """MiniMind-3's YaRN (the paper's "NTK-by-parts" blend): f_i * ((1 - g_i) + g_i / s), with g_i a
    linear ramp from 0 at pair `low` to 1 at pair `high`. Pair i turns (original_max * f_i / 2pi)
    times over the training context; `low` is the pair that turns beta_fast times, `high` the one
    that turns beta_slow times: faster pairs keep their frequency, slower ones are divided by s."""
    half = freqs.shape[0]
    dim, original_max, factor = 2 * half, yarn["original_max_position_embeddings"], yarn["factor"]

    def pair_turning(turns):  # the (fractional) pair index that turns `turns` times over original_max
        return dim * math.log(original_max / (turns * 2 * math.pi)) / (2 * math.log(rope_theta))

    low = max(math.floor(pair_turning(yarn["beta_fast"])), 0)
    high = min(math.ceil(pair_turning(yarn["beta_slow"])), half - 1)
    ramp = ((torch.arange(half, device=freqs.device).float() - low) / max(high - low, 0.001)).clamp(0, 1)
    return freqs * (1 - ramp + ramp / factor)


# The YaRN formulas of the families (families.Family.yarn): MiniMind2's ramp, MiniMind-3's NTK-by-parts.
YARN_SCALES = {"ramp": ramp_yarn_scale, "ntk-by-parts": ntk_by_parts_yarn_scale}


def rotary_frequencies(head_dim, end, rope_theta, yarn=None, formula="ramp"):
    """f_i, the angle per position of each pair i of a head, (head_dim / 2,), for a table of `end` positions.

    Pair i of a head rotates by angle position * f_i with f_i = theta^(-2i/D): fast rotations
    for the first pairs, slow ones for the last. With `yarn` (the parameters of the original's
    YaRN variant whose `formula` is named) and a table longer than the training context, frequencies are scaled
    down so that long positions look like familiar ones (YARN_SCALES).
    """
    half = head_dim // 2
    # On the CPU explicitly: from_pretrained builds modules under a meta-device default, where the
    # comparisons in the YaRN scales (Python bools of tensors) cannot be evaluated.
    cpu = torch.device("cpu")
    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, device=cpu)[:half].float() / head_dim))
    if yarn is not None and end / yarn["original_max_position_embeddings"] > 1.0:
        freqs = YARN_SCALES[formula](freqs, yarn, rope_theta)
    return freqs


def precompute_rotary_frequencies(head_dim, end, rope_theta, yarn=None, formula="ramp"):
    """cos and sin tables, each (end, head_dim), for positions 0..end-1 (see rotary_frequencies).
    MiniMind-3's YaRN parameters may also scale both tables by an attention_factor (1 by default)."""
    freqs = rotary_frequencies(head_dim, end, rope_theta, yarn, formula)
    angles = torch.outer(torch.arange(end, device=freqs.device), freqs).float()
    # The two halves of a head form the rotated pairs (x_i, x_{i+D/2}), hence the repeated table.
    cos, sin = torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([angles.sin(), angles.sin()], dim=-1)
    attention_factor = (yarn or {}).get("attention_factor", 1.0)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def swap_halves(x):
    """(x1, x2) -> (x2, x1) on the two halves of the last dimension: each pair's partner."""
    return x.roll(x.shape[-1] // 2, dims=-1)


def apply_rotary_embedding(q, k, cos, signed_sin):
    """Rotate queries (B, H, S, D) and keys (B, G, S, D) by their positions; cos, signed_sin are (B, 1, S, D).

    Pair (x1, x2) turns by angle a: (x1 cos a - x2 sin a, x2 cos a + x1 sin a), that is
    x * cos + swap_halves(x) * (-sin, sin). With the sign kept in the table this is three passes
    over q (a copy, a multiply, a fused multiply-add) instead of the five of negate-and-concatenate.
    After rotation, q_m . k_n depends only on m - n: attention sees relative positions.
    """
    return torch.addcmul(q * cos, swap_halves(q), signed_sin), torch.addcmul(k * cos, swap_halves(k), signed_sin)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables and looks up the rows for given positions.

    The sin table is stored signed, (-sin, sin) over the two halves of a head, as
    apply_rotary_embedding uses it.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        # Computed on the CPU, then placed where modules are being built (the meta device inside
        # from_pretrained, a GPU under `with torch.device("cuda")`). Not saved in checkpoints: they are
        # a function of the config.
        cos, sin = (table.to(torch.get_default_device()) for table in self.tables())
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self):
        config = self.config
        yarn = config.yarn_parameters if config.inference_rope_scaling else None
        cos, sin = precompute_rotary_frequencies(config.head_dim, config.max_position_embeddings, config.rope_theta, yarn,
                                                 config.family.yarn)
        half = config.head_dim // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    def forward(self, position_ids, dtype):
        """position_ids (B, S) -> cos, signed sin of shape (B, 1, S, D), broadcast over heads."""
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


class KVCache:
    """Keys and values of past tokens, so each new token attends without recomputing them.

    Buffers are preallocated per layer as (B, G, capacity, D) and filled in place; when full they
    double, so appending a token costs one copy of that token, not of the whole history.
    Same interface as transformers' caches: update(k, v, layer_idx) and get_seq_length().
    """

    def __init__(self, capacity=256):
        self.capacity = capacity
        self.keys, self.values, self.lengths = [], [], []

    def get_seq_length(self, layer_idx=0):
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def update(self, key, value, layer_idx):
        """Append key/value (B, G, S, D) for one layer; return all keys/values so far (B, G, K, D)."""
        if layer_idx == len(self.keys):
            size = max(self.capacity, key.shape[2])
            self.keys.append(key.new_empty(*key.shape[:2], size, key.shape[3]))
            self.values.append(value.new_empty(*value.shape[:2], size, value.shape[3]))
            self.lengths.append(0)
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + key.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            self.keys[layer_idx] = self._grow(self.keys[layer_idx], end)
            self.values[layer_idx] = self._grow(self.values[layer_idx], end)
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    @staticmethod
    def _grow(buffer, needed):
        grown = buffer.new_empty(*buffer.shape[:2], max(needed, 2 * buffer.shape[2]), buffer.shape[3])
        grown[:, :, : buffer.shape[2]] = buffer
        return grown


def fused_kernel_groups_heads(q, attention_mask):
    """Whether SDPA runs a fused kernel on grouped key/value heads as they are (enable_gqa). On CUDA
    only flash attention does, in half precision and without a mask: with a padding mask (batched
    generation, GRPO rollouts, the server) or in float32, enable_gqa would send attention to the
    unfused math kernel. The CPU's and MPS's kernels take the groups."""
    return not q.is_cuda or (attention_mask is None and q.dtype in (torch.float16, torch.bfloat16))


def repeat_key_value_heads(k, v, groups):
    """(B, G, K, D) -> (B, G * groups, K, D): each key/value head repeated for the query heads it
    serves (query head h reads key/value head h // groups, as enable_gqa does), so that the
    memory-efficient kernel can run where enable_gqa has none."""
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


class Attention(nn.Module):
    """Grouped-query causal self-attention.

    H query heads share G key/value heads (H/G queries per group): the cache, the largest memory
    cost of generation, shrinks by H/G while queries keep their full resolution.
    softmax(q k^T / sqrt(D) + mask) v, per head, then the output projection.

    With qk_norm (MiniMind-3, as Qwen3), each head's query and key vectors go through their own
    RMSNorm (weights (D,) shared by all heads) before the rotation: q k^T / sqrt(D) is then bounded
    by the norms' gains instead of growing with the projections' weights, so attention logits
    cannot blow up into a one-hot softmax during training.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = family_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = family_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        # dropout on the attention probabilities; None follows `dropout`, as in the original
        self.dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, attention_mask=None, cache=None):
        """x (B, S, hidden); rotary = (cos, sin); attention_mask: None (plain causal) or bool (B, 1, S, K)."""
        batch, seq_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq_len, self.num_key_value_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_embedding(q, k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # A single new token may see every cached key; a chunk needs the mask the model built.
        is_causal = attention_mask is None and k.shape[2] == seq_len and seq_len > 1
        if self.num_key_value_heads != self.num_heads and not fused_kernel_groups_heads(q, attention_mask):
            k, v = repeat_key_value_heads(k, v, self.num_heads // self.num_key_value_heads)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        out = out.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.resid_dropout(self.o_proj(out))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate decides, per feature, how much of up(x) passes.
    Width: config.intermediate_size, or `intermediate_size` (a MiniMind-3 expert's)."""

    def __init__(self, config, intermediate_size=None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    """The router (MiniMind2's): scores each token against each routed expert and keeps the top k.

    Also computes the load-balancing loss alpha * sum_e f_e * P_e, where P_e is the mean routing
    probability of expert e and f_e the (normalised) share of tokens sent to it: it is smallest
    when the load is spread evenly. seq_aux computes it per sequence and averages, otherwise over
    all tokens of the batch.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, x):
        """x (B, S, hidden) -> expert indices (B*S, k), weights (B*S, k), aux loss (scalar)."""
        batch, seq_len, hidden = x.shape
        scores = F.linear(x.reshape(-1, hidden), self.weight).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        topk_weight = self.renormalise(topk_weight)
        aux_loss = scores.new_zeros(())
        if self.training and self.alpha > 0.0:
            aux_loss = self.balance_loss(scores, topk_idx, batch, seq_len)
        return topk_idx, topk_weight, aux_loss

    def renormalise(self, topk_weight):
        """The k weights divided by their sum; not for k = 1, where the weight would always be 1."""
        if self.top_k > 1 and self.norm_topk_prob:
            return topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weight

    def balance_loss(self, scores, topk_idx, batch, seq_len):
        """scores (B*S, E), topk_idx (B*S, k) -> alpha * sum_e f_e P_e, per sequence or over the batch."""
        experts = self.n_routed_experts
        if self.seq_aux:
            counts = torch.zeros(batch, experts, device=scores.device)
            counts.scatter_add_(1, topk_idx.view(batch, -1), torch.ones(batch, seq_len * self.top_k, device=scores.device))
            load = counts / (seq_len * self.top_k / experts)
            return (load * scores.view(batch, seq_len, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
        load = F.one_hot(topk_idx.view(-1), num_classes=experts).float().mean(0) * experts
        return (scores.mean(0) * load).sum() * self.alpha


class MiniMind3Gate(MoEGate):
    """MiniMind-3's router: the same scores and top k, with two differences.

    - norm_topk_prob renormalises the k weights even for k = 1 (each weight is then 1: the output
      is the chosen expert's alone, and the router learns only through the balance loss);
    - the balance loss is the Switch Transformer's over all B*S = N tokens of the batch:
      coef * E * sum_e (tokens routed to e / N) * P_e, where a token counts once per slot that
      chose e, so an even top-k load gives coef * k.
    """

    def renormalise(self, topk_weight):
        if self.norm_topk_prob:
            return topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weight

    def balance_loss(self, scores, topk_idx, batch, seq_len):
        load = F.one_hot(topk_idx, self.n_routed_experts).float().mean(0)  # (k, E): share of tokens, per slot
        return (load * scores.mean(0)).sum() * self.n_routed_experts * self.alpha


# The routers of the families (families.Family.router): MiniMind2's (DeepSeek-MoE's), MiniMind-3's.
ROUTERS = {"deepseek": MoEGate, "switch": MiniMind3Gate}


class MoEFeedForward(nn.Module):
    """Mixture of experts: each token goes through its top-k routed experts, weighted by the router,
    plus the shared experts that every token uses (MiniMind2 has one, MiniMind-3 none). More
    parameters, the same compute per token."""

    def __init__(self, config):
        super().__init__()
        self.experts = nn.ModuleList([FeedForward(config, config.moe_intermediate_size)
                                      for _ in range(config.n_routed_experts)])
        self.gate = ROUTERS[config.family.router](config)
        if config.n_shared_experts > 0:
            self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])

    def forward(self, x):
        """x (B, S, hidden) -> (output (B, S, hidden), the router's load-balancing loss)."""
        topk_idx, topk_weight, aux_loss = self.gate(x)
        flat = x.reshape(-1, x.shape[-1])
        # Accumulate in the activations' own dtype (the original used a float16 buffer in training).
        y = torch.zeros_like(flat)
        for expert_idx, expert in enumerate(self.experts):
            token_idx, slot = torch.where(topk_idx == expert_idx)
            # In training an expert that got no token still runs (on nothing): its weights then get a
            # zero gradient, which DistributedDataParallel waits for from every parameter.
            if token_idx.numel() or self.training:
                out = expert(flat[token_idx]) * topk_weight[token_idx, slot].unsqueeze(-1)
                y.index_add_(0, token_idx, out.to(y.dtype))
        y = y.view_as(x)
        for expert in getattr(self, "shared_experts", []):
            y = y + expert(x)
        return y, aux_loss


class MiniMindBlock(nn.Module):
    """One transformer layer, pre-norm: x + attn(norm(x)), then h + ffn(norm(h)).

    Returns the new hidden states and the layer's MoE load-balancing loss (0 for a dense layer)."""

    def __init__(self, layer_idx, config):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = family_norm(config, config.hidden_size)
        self.post_attention_layernorm = family_norm(config, config.hidden_size)
        self.use_moe = config.use_moe
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, rotary, attention_mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), rotary, attention_mask, cache)
        if self.use_moe:
            out, aux_loss = self.mlp(self.post_attention_layernorm(h))
        else:
            out, aux_loss = self.mlp(self.post_attention_layernorm(h)), h.new_zeros((), dtype=torch.float32)
        return h + out, aux_loss


def build_attention_mask(attention_mask, seq_len, past_len, device):
    """Combine causality with padding into a bool mask (B, 1, S, K), or None when plain causal will do.

    attention_mask (B, K) marks real tokens (1) and padding (0) over cached + new positions.
    Query i (absolute position past_len + i) may see key j when j <= past_len + i and j is real.
    """
    if attention_mask is None or bool(attention_mask.all()):
        if past_len == 0 or seq_len == 1:
            return None  # SDPA's is_causal (or no mask for a single new token) is exact here
        attention_mask = None
    total = past_len + seq_len
    causal = torch.ones(seq_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len)
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -total:].bool()
    # A padding query may have nothing to see; let it see everything rather than produce NaN
    # (its output is never used).
    return mask | ~mask.any(dim=-1, keepdim=True)


class MiniMindModel(nn.Module):
    """Embedding, the stack of blocks, and the final norm: token ids -> hidden states, and the
    MoE load-balancing loss summed over layers."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = family_norm(config, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        # Activation checkpointing (train.py --gradient_checkpointing): keep only each block's input
        # for backward and run the block's forward again there; ~1/3 more compute, a fraction of the
        # activation memory.
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        batch, seq_len = input_ids.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: each row counts positions from its first real token, so a padded
                # row sees exactly the positions it would see alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_len, past_len + seq_len, device=input_ids.device).expand(batch, -1)
        hidden = self.dropout(self.embed_tokens(input_ids))
        # Under autocast the projections give half-precision q and k: tables in that dtype keep them so
        # (float32 tables would promote q and k to float32 before attention).
        kind = hidden.device.type
        autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        rotary = self.rotary_emb(position_ids, torch.get_autocast_dtype(kind) if autocast else hidden.dtype)
        mask = build_attention_mask(attention_mask, seq_len, past_len, input_ids.device)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        aux_loss = hidden.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            if checkpointing:
                hidden, layer_aux_loss = checkpoint(layer, hidden, rotary, mask, cache, use_reentrant=False)
            else:
                hidden, layer_aux_loss = layer(hidden, rotary, mask, cache)
            aux_loss = aux_loss + layer_aux_loss
        return self.norm(hidden), aux_loss


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMindBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MoEGate):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, RotaryEmbedding):
            # Buffers are not in checkpoints; rebuild them after meta-device loading.
            cos, sin = module.tables()
            with torch.no_grad():
                module.cos.copy_(cos)
                module.sin.copy_(sin)


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """The language model: hidden states -> logits, the next-token loss, the MoE auxiliary loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config=None):
        config = config or MiniMindConfig()
        config.check()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=False,
                position_ids=None, logits_to_keep=0, cache=None, num_items_in_batch=None, return_logits=True,
                loss_reduction="mean", **kwargs):
        """Returns logits (B, S, vocab), or None with return_logits=False (training needs only the loss);
        loss, when labels are given: the next-token cross-entropy over labels != IGNORE_INDEX (labels are
        the input ids, shifted here), computed by kernels without full logits: summed and divided
        by num_items_in_batch (default: the number of labelled tokens, that is the mean), or with
        loss_reduction="sequence" summed per sequence, (B,), or "token" per token, (B, S); aux_loss: the summed MoE
        load-balancing loss (0 for dense models or in eval mode); cache, the key/value cache, when
        use_cache (transformers 5 calls it `cache`; `past_key_values` is accepted as its old name)."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = KVCache()
        hidden, aux_loss = self.model(input_ids, attention_mask, position_ids, cache)
        loss = None
        if labels is not None and loss_reduction in ("sequence", "token"):
            loss = next_token_losses(hidden, output_weight(self.lm_head), labels)
            loss = loss.sum(-1) if loss_reduction == "sequence" else loss
        elif labels is not None:
            loss = next_token_loss(hidden, output_weight(self.lm_head), labels, num_items_in_batch)
        logits = None
        if return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, cache=cache if use_cache else None
        )

    def sequence_log_probs(self, input_ids, labels, attention_mask=None):
        """Per sequence, the summed log-probability of its labelled tokens, log p(labelled | prefix),
        (B,), and how many tokens that is, (B,): a response's likelihood for DPO, a text's for
        perplexity. The same cross-entropy as the loss, per sequence (forward's loss_reduction)."""
        out = self(input_ids, attention_mask=attention_mask, labels=labels, loss_reduction="sequence",
                   return_logits=False)
        return -out.loss, (labels[:, 1:] != IGNORE_INDEX).sum(-1)


# After this import, AutoModelForCausalLM opens directories whose config.json says model_type "minimind";
# save_pretrained copies this file (and config.py, kernels.py) beside the weights for trust_remote_code.
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")
