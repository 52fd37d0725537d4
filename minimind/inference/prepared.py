"""The model as the decoder runs it: the same computation as model/model.py's forward, with the
weight matrices prepared for speed and the keys and values in a SlotCache.

What changes against the textbook forward (and why; docs/benchmarks.md has the profile):
- q, k and v are one matrix, and so are the feed-forward's gate and up: one pass over the input
  and one call instead of three (or two);
- every matrix is in the layout that streams fastest (weights.LinearWeights: oneDNN-packed float,
  or int8 with row scales when `quantize="int8"`);
- the cache has a row per sequence with its own length (kv_cache.SlotCache): a batch of prompts of
  different lengths needs no left padding, and rows join and leave a running batch in place.
Norms, rotary embeddings, the q/k norms and mixture-of-experts feed-forwards are the model's own
modules, called as they are. tests/test_generation.py checks the logits against the model's forward
and the greedy tokens against the full-forward argmax.

Two passes use it: `prefill` (a chunk of prompt tokens for some rows, all starting at the same
column) and `step` (one new token for each of rows 0..B-1, each at its own column). The decode loop
(decoding.decode) and the server's engine (serving/engine.py) are built on these two.
"""
import torch
import torch.nn.functional as F

from ..model.lora import merged_copy
from ..model.model import apply_rotary_embedding
from .kv_cache import SlotCache
from .weights import QUANTIZE_CHOICES, Int8Linear, stacked


class PreparedLayer:
    """One MiniMindBlock with its matrices prepared: x + attention(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, block, config, quantize):
        self.block, attention = block, block.self_attn
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv = stacked([attention.q_proj, attention.k_proj, attention.v_proj], quantize)
        self.split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self.o = stacked([attention.o_proj], quantize)
        self.gate_up = self.down = None
        if not block.use_moe:  # a mixture of experts runs its own module (each token meets other experts)
            self.gate_up = stacked([block.mlp.gate_proj, block.mlp.up_proj], quantize)
            self.down = stacked([block.mlp.down_proj], quantize)

    def __call__(self, hidden, rotary, store, mask=None, is_causal=False):
        """hidden (B, S, C); store(k, v) puts the new keys and values in the cache and returns those to
        attend to; mask: None or bool (B or 1, 1, S, K)."""
        block, attention = self.block, self.block.self_attn
        batch, seq_len, _ = hidden.shape
        q, k, v = self.qkv(block.input_layernorm(hidden)).split(self.split, dim=-1)
        q = attention.q_norm(q.view(batch, seq_len, self.heads, self.head_dim)).transpose(1, 2)
        k = attention.k_norm(k.view(batch, seq_len, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, seq_len, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_embedding(q, k, *rotary)
        keys, values = store(k, v)
        if seq_len == 1:  # one query a row: softmax(q k^T / sqrt(D) + mask) v, each key/value head's queries together
            queries = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            scores = queries @ keys.transpose(-1, -2) * self.head_dim ** -0.5
            out = (scores if mask is None else scores + mask).softmax(dim=-1) @ values
            hidden = hidden + self.o(out.reshape(batch, 1, -1))
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal,
                                                 enable_gqa=self.kv_heads != self.heads)
            hidden = hidden + self.o(out.transpose(1, 2).reshape(batch, seq_len, -1))
        x = block.post_attention_layernorm(hidden)
        if self.gate_up is None:
            return hidden + block.mlp(x)[0]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return hidden + self.down(block.mlp.act_fn(gate) * up)


class PreparedModel:
    """A MiniMindForCausalLM prepared for decoding (see the module docstring). `model` stays usable
    as it is (its own forward scores text in `eval`); the prepared matrices are copies, made again
    when the weights change (GRPO prepares at each rollout)."""

    def __init__(self, model, quantize=None):
        if quantize not in (None, *QUANTIZE_CHOICES):
            raise ValueError(f"quantize: None or one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
        if getattr(model, "peft_config", None):  # LoRA during training: decode with the adapters merged in
            model = merged_copy(model)
        self.model, self.config = model, model.config
        if quantize is None and any(isinstance(m, Int8Linear) for m in model.modules()):
            quantize = "int8"
        self.quantize = quantize
        embedding = model.model.embed_tokens.weight
        self.device, self.dtype = embedding.device, embedding.dtype
        with torch.no_grad():
            self.layers = [PreparedLayer(block, self.config, quantize) for block in model.model.layers]
            self.lm_head = stacked([model.lm_head], quantize)

    @property
    def context_length(self):
        return self.config.max_position_embeddings

    def new_cache(self, slots, limit, capacity=256):
        """A SlotCache for this model: `slots` rows of at most `limit` tokens each."""
        config = self.config
        limit = min(limit, self.context_length)
        return SlotCache(config.num_hidden_layers, slots, config.num_key_value_heads, config.head_dim, self.dtype,
                         self.device, limit, capacity)

    def weight_bytes(self):
        """Bytes of matrices one decode step reads (the embedding row aside)."""
        return sum(m.nbytes() for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)
                   if m is not None) + self.lm_head.nbytes()

    def _layers(self, input_ids, positions, store_of_layer, mask=None, is_causal=False):
        hidden = self.model.model.embed_tokens(input_ids)
        rotary = self.model.model.rotary_emb(positions, hidden.dtype)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotary, store_of_layer(index), mask, is_causal)
        return hidden

    def _logits(self, hidden):
        return self.lm_head(self.model.model.norm(hidden)).float()

    @torch.inference_mode()
    def prefill(self, cache, rows, input_ids, start=0, lengths=None):
        """Feed a chunk of tokens, input_ids (n, S), to `rows` of `cache` (n slot numbers), all of
        which hold `start` tokens. Rows shorter than S are right-padded and give their real length
        in `lengths` (the padding lands in columns that decoding overwrites before it is seen).
        Returns the logits after each row's last real token, (n, vocab) float32."""
        batch, seq_len = input_ids.shape
        lengths = [seq_len] * batch if lengths is None else list(lengths)
        cache.reserve(start + seq_len)
        positions = torch.arange(start, start + seq_len, device=self.device)[None]
        mask = None
        if start > 0 and seq_len > 1:  # query i sees the `start` cached keys and new keys 0..i
            mask = torch.ones(seq_len, start + seq_len, dtype=torch.bool, device=self.device).tril(start)[None, None]

        def store_of_layer(layer):
            def store(k, v):
                keys, values = cache.store_chunk(layer, rows, start, k, v)
                return (k, v) if start == 0 else (keys, values)
            return store

        hidden = self._layers(input_ids, positions, store_of_layer, mask, is_causal=start == 0 and seq_len > 1)
        for row, length in zip(rows, lengths):
            cache.lengths[row] = start + length
        last = torch.tensor(lengths, device=self.device) - 1
        return self._logits(hidden[torch.arange(batch, device=self.device), last])

    @torch.inference_mode()
    def step(self, cache, tokens, active=None):
        """One new token for each of rows 0..B-1, tokens (B,); each row attends to its own length.
        active (B bools): rows that are not decoding (free, or half-way through a chunked prefill) are
        carried along and keep their length (what they write lies where their next tokens go).
        Returns the logits (B, vocab) float32."""
        batch = tokens.shape[0]
        lengths = cache.lengths[:batch]
        active = [True] * batch if active is None else list(active)
        live = [length for length, on in zip(lengths, active) if on]
        width = max(live) + 1
        cache.reserve(max(lengths) + 1)
        columns = torch.tensor(lengths, device=self.device)
        same_column = lengths[0] if all(length == lengths[0] for length in lengths) and all(active) else None
        mask = None
        if same_column is None:  # each row sees its own columns (an idle row column 0 only): -inf elsewhere
            seen = torch.tensor([length if on else 0 for length, on in zip(lengths, active)], device=self.device)
            hidden_columns = torch.arange(width, device=self.device)[None] > seen[:, None]
            mask = torch.zeros(batch, 1, 1, width, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill_(hidden_columns[:, None, None], float("-inf"))

        def store_of_layer(layer):
            return lambda k, v: cache.store_tokens(layer, columns, k, v, width, same_column)

        hidden = self._layers(tokens[:, None], columns[:, None], store_of_layer, mask)
        for row, on in enumerate(active):
            if on:
                cache.lengths[row] += 1
        return self._logits(hidden[:, -1])


def prepare(model, quantize=None):
    """The PreparedModel of `model` (made now), or `model` itself when it is one already."""
    if isinstance(model, PreparedModel):
        if quantize not in (None, model.quantize):
            raise ValueError(f"the model was prepared with quantize={model.quantize!r}, not {quantize!r}")
        return model
    return PreparedModel(model, quantize)
