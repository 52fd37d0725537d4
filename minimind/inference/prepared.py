"""The model as the decoder runs it: the same computation as model/model.py's forward, with the
weight matrices prepared for speed and the keys and values in a SlotCache.

What changes against the textbook forward (and why; docs/benchmarks.md has the profile):
- q, k and v are one matrix, and so are the feed-forward's gate and up: one pass over the input
  and one call instead of three (or two);
- every matrix is in the layout that streams fastest (weights.LinearWeights: oneDNN-packed float,
  and for a few rows the copy that one step's products read fastest here, measured once per
  process (weights.settle_few_rows; `few_rows` says what it found); or int8 with row scales when
  `quantize="int8"`);
- the cache has a row per sequence with its own length (kv_cache.SlotCache): a batch of prompts of
  different lengths needs no left padding, and rows join and leave a running batch in place;
- a decoding step runs on (rows, C), one token a row, with as few torch calls as it can: each
  costs several us once the step's weights have swept the caches (docs/benchmarks.md, "Fewer
  calls a step"), so the norms (StepNorm) and SiLU are called directly, not through their modules.
- a mixture of experts' experts are prepared like a dense feed-forward, and one row calls its k
  experts directly (PreparedExperts); its router is the model's float matrix, so rows go to the
  experts the model's forward would choose.
The norms' gains, the rotary tables and the q/k norms are the model's own, used as they are.
tests/test_generation.py checks the logits against the model's forward
and the greedy tokens against the full-forward argmax.

Two passes use it: `prefill` (a chunk of prompt tokens for some rows, all starting at the same
column) and `step` (one new token for each of rows 0..B-1, each at its own column). The decode loop
(decoding.decode) and the server's engine (serving/engine.py) are built on these two; the engine
also runs both at once (`step_and_prefill`: the matrix products of a step's rows and a prompt's
tokens in one call each, so a prompt that arrives while others decode costs one pass, not two).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..model.kernels import rms_norm
from ..model.lora import merged_copy
from .kv_cache import SlotCache
from .weights import QUANTIZE_CHOICES, Int8Linear, matrix_of, rows_of, settle_few_rows, stacked


def paired_order(heads, head_dim):
    """Row order of a q or k projection that puts the pairs rotary embedding turns together, (i, i + D/2)
    of each head, side by side: 0, D/2, 1, D/2 + 1, ... A pair is then one complex number, and the
    rotation one complex multiplication. Attention is unchanged: q . k sums over the same products
    when q and k are reordered alike."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return (torch.arange(heads)[:, None] * head_dim + within).reshape(-1)


def rotate_pairs_(x, rotation):
    """x (..., D) with its pairs side by side, turned in place by `rotation` (complex, (..., D/2))."""
    if x.dtype == torch.float32:
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rotation)
    else:  # no complex bfloat16 arithmetic on the CPU: turn in float32 and write back
        turned = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous()) * rotation
        x.copy_(torch.view_as_real(turned).flatten(-2))


class StepNorm:
    """An RMSNorm as the decoder calls it (without nn.Module's call: a few us each, 17 a token): in
    float32, w * x / sqrt(mean(x^2) + eps) in five torch calls, the mean square as one dot product of
    each row with itself; torch's rms_norm takes nine on the CPU (pow, sum, div, add, rsqrt, two
    multiplications, two copies), 4-9% of a decoding step (docs/benchmarks.md, "Fewer calls a step").
    The same numbers within float32 rounding. Other dtypes: kernels.rms_norm, as the model computes it."""

    def __init__(self, weight, eps, scale_in_float32):
        self.weight, self.eps, self.scale_in_float32 = weight.detach(), eps, scale_in_float32
        self.eps_tensor = torch.tensor(eps, dtype=torch.float32, device=weight.device)
        self.inverse_width = torch.tensor(1 / weight.shape[-1], dtype=torch.float32, device=weight.device)

    @classmethod
    def of(cls, module):
        return cls(module.weight, module.eps, module.scale_in_float32)

    def __call__(self, x):
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return rms_norm(x, self.weight, self.eps, self.scale_in_float32)
        inverse_rms = torch.addcmul(self.eps_tensor, torch.linalg.vecdot(x, x), self.inverse_width).rsqrt_()
        return torch.mul(x, self.weight).mul_(inverse_rms.unsqueeze(-1))


def rotation_table(rotary):
    """Each position's turn of each pair as a complex number, (positions, D/2), from the model's own
    tables (YaRN's scaling included): cos a + i sin a. Made once per table and kept beside it: GRPO
    prepares the model at every rollout, and the 32,768 positions of MiniMind's context took 1-2 ms."""
    made = getattr(rotary, "_decoder_rotation", None)
    if made is None or made[0] is not rotary.cos:  # none yet, or the tables were moved (.to)
        half = rotary.cos.shape[-1] // 2
        made = (rotary.cos, torch.complex(rotary.cos[:, :half].float(), rotary.sin[:, half:].float()))
        rotary._decoder_rotation = made
    return made[1]


def in_dtype(x, dtype):
    """x.to(dtype), without a call into torch when it is in dtype already (a step's small calls add up)."""
    return x if x.dtype == dtype else x.to(dtype)


class PreparedLayer:
    """One MiniMindBlock with its matrices prepared: x + attention(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, block, config, quantize):
        attention = block.self_attn
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        # 1/sqrt(D) as a tensor: a Python number is made into one at every call (~3 us, a layer a step)
        self.score_scale = torch.tensor(self.head_dim ** -0.5, device=block.input_layernorm.weight.device)
        q_rows, k_rows = paired_order(self.heads, self.head_dim), paired_order(self.kv_heads, self.head_dim)
        self.qkv = stacked([rows_of(matrix_of(attention.q_proj, quantize), q_rows),
                            rows_of(matrix_of(attention.k_proj, quantize), k_rows),
                            matrix_of(attention.v_proj, quantize)])
        self.o = stacked([matrix_of(attention.o_proj, quantize)])
        within_head = paired_order(1, self.head_dim)
        self.qk_norms = None
        if not isinstance(attention.q_norm, nn.Identity):  # MiniMind-3: their gains, in the paired order
            self.qk_norms = [StepNorm(norm.weight[within_head], norm.eps, norm.scale_in_float32)
                             for norm in (attention.q_norm, attention.k_norm)]
        self.input_norm = StepNorm.of(block.input_layernorm)
        self.post_attention_norm = StepNorm.of(block.post_attention_layernorm)
        kind = PreparedExperts if block.use_moe else PreparedFeedForward
        self.feed = kind(block.mlp, config, quantize)

    def __call__(self, hidden, rotation, store, mask=None, is_causal=False):
        """hidden (B, S, C), a chunk of S tokens a row, or (B, C), one token a row (a decoding step);
        rotation (S, 1, D/2), (B, 1, D/2) or (D/2,), complex; store(keys_values) puts the new keys and
        values in the cache, (B, 2G, S, D) for a chunk and (B, 2G, D) for one token a row, and returns
        those to attend to: keys and values (B, G, K, D) for a chunk, (B x G, K, D) for one token a row
        (kv_cache.SlotCache.store_chunk, store_tokens); mask: None, or additive (B x G, 1, K) for one
        token a row, or bool (1, 1, S, K) for a chunk."""
        qkv = in_dtype(self.qkv(self.input_norm(hidden)), hidden.dtype)  # attention in the model's dtype
        return self.feed_forward(hidden + self.o(self.attention(qkv, rotation, store, mask, is_causal)))

    def groups(self, hidden, shapes, groups):
        """The layer over several groups of rows at once (a decoding step's rows, and a prompt chunk of
        other rows): hidden (1, T, C) holds every group's tokens, one after another, group i's of
        shape shapes[i] ((B, S, C) or (B, C), as __call__ takes them); groups[i] is its (rotation,
        store, mask, is_causal). Each group's attention runs on its own, the matrix products of all
        the tokens in one call each, which reads every weight once where separate passes read it
        once per group. Returns the new hidden (1, T, C)."""
        qkv = in_dtype(self.qkv(self.input_norm(hidden)), hidden.dtype)
        counts = [shape.numel() // shape[-1] for shape in shapes]
        pieces = qkv.split(counts, dim=1)
        out = torch.cat([self.attention(piece.view(*shape[:-1], -1), *group).reshape(1, count, -1)
                         for piece, shape, count, group in zip(pieces, shapes, counts, groups)], dim=1)
        return self.feed_forward(hidden + self.o(out))

    def attention(self, qkv, rotation, store, mask, is_causal):
        """qkv (B, S, (H + 2G) x D) -> the attention's output (B, S, H x D), before the o projection;
        (B, (H + 2G) x D), one token a row, -> (B, H x D)."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv = qkv.view(*qkv.shape[:-1], heads + 2 * kv_heads, head_dim)
        if self.qk_norms is not None:
            for part, norm in zip((qkv[..., :heads, :], qkv[..., heads:heads + kv_heads, :]), self.qk_norms):
                part.copy_(norm(part))
        rotate_pairs_(qkv[..., :heads + kv_heads, :], rotation)  # q and k, in place
        if qkv.dim() == 3:
            return self.token_attention(qkv, store, mask)
        batch, seq_len = qkv.shape[:2]
        keys, values = store(qkv[:, :, heads:].transpose(1, 2))
        out = F.scaled_dot_product_attention(qkv[:, :, :heads].transpose(1, 2), keys, values, attn_mask=mask,
                                             is_causal=is_causal, enable_gqa=kv_heads != heads)
        return out.transpose(1, 2).reshape(batch, seq_len, -1)

    def token_attention(self, qkv, store, mask):
        """One query a row, qkv (B, H + 2G, D) turned -> (B, H x D): softmax(q k^T / sqrt(D) + mask) v as two
        batched products over (row, key/value head) pairs, each pair's queries together; the cache's keys
        and values are used where they lie."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        batch = qkv.shape[0]
        keys, values = store(qkv[:, heads:])
        queries = qkv[:, :heads].reshape(batch * kv_heads, heads // kv_heads, head_dim)
        if mask is None:
            scores = torch.bmm(queries, keys.transpose(1, 2)).mul_(self.score_scale)
        else:
            scores = torch.baddbmm(mask, queries, keys.transpose(1, 2), alpha=head_dim ** -0.5)
        return torch.bmm(scores.softmax(dim=-1), values).view(batch, -1)

    def feed_forward(self, hidden):
        """h + ffn(norm(h))."""
        return hidden + self.feed(self.post_attention_norm(hidden))


class PreparedFeedForward:
    """SwiGLU (model.FeedForward) with its matrices prepared: down(act(gate(x)) * up(x)), gate and up
    as one matrix."""

    def __init__(self, mlp, config, quantize):
        self.gate_up = stacked([matrix_of(mlp.gate_proj, quantize), matrix_of(mlp.up_proj, quantize)])
        self.down = stacked([matrix_of(mlp.down_proj, quantize)])
        self.act = F.silu if config.hidden_act == "silu" else mlp.act_fn

    def matrices(self):
        return [self.gate_up, self.down]

    def bytes_read(self):
        return sum(m.nbytes() for m in self.matrices())

    def __call__(self, x):
        gate_up, inner = self.gate_up(x), self.down.in_features
        return self.down(self.act(gate_up[..., :inner]).mul_(gate_up[..., inner:]))


class PreparedExperts:
    """A mixture of experts (model.MoEFeedForward) with each expert prepared as a PreparedFeedForward
    (int8 too): the router as the model computes it (the same scores, top k and renormalisation, from
    its float matrix), then each expert on the rows that chose it, weighted, in the experts' order,
    plus the shared experts. One row, a decoding step's at batch 1, calls its k experts directly
    rather than searching every expert's rows."""

    def __init__(self, moe, config, quantize):
        self.router, self.top_k, self.renormalise = moe.gate.weight.detach(), moe.gate.top_k, moe.gate.renormalise
        self.experts = [PreparedFeedForward(expert, config, quantize) for expert in moe.experts]
        self.shared = [PreparedFeedForward(expert, config, quantize) for expert in getattr(moe, "shared_experts", [])]

    def matrices(self):
        return [m for expert in self.experts + self.shared for m in expert.matrices()]

    def bytes_read(self):
        """What one token reads: its k routed experts and the shared ones."""
        routed = sum(expert.bytes_read() for expert in self.experts) * self.top_k / len(self.experts)
        return routed + sum(expert.bytes_read() for expert in self.shared)

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(F.linear(flat, self.router).softmax(dim=-1), self.top_k, dim=-1, sorted=False)
        weights = self.renormalise(weights)
        if flat.shape[0] == 1:
            out = None
            for index, slot in sorted(zip(chosen[0].tolist(), range(self.top_k))):
                part = in_dtype(self.experts[index](flat) * weights[:, slot:slot + 1], flat.dtype)
                out = part if out is None else out + part
        else:
            out = torch.zeros_like(flat)
            for index, expert in enumerate(self.experts):
                rows, slot = torch.where(chosen == index)
                if rows.numel():
                    part = expert(flat[rows]) * weights[rows, slot].unsqueeze(-1)
                    out.index_add_(0, rows, in_dtype(part, flat.dtype))
        for expert in self.shared:
            out = out + expert(flat)
        return out.view_as(x)


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
        # None, or a threads.ThreadPolicy: decode's steps then run on the thread count that has been
        # faster (the decoding commands on a CPU set it; the server's engine keeps its own).
        self.threads = None
        if quantize is None and any(isinstance(m, Int8Linear) for m in model.modules()):
            quantize = "int8"
        self.quantize = quantize
        embedding = model.model.embed_tokens.weight
        self.device, self.dtype = embedding.device, embedding.dtype
        with torch.no_grad():
            self.layers = [PreparedLayer(block, self.config, quantize) for block in model.model.layers]
            self.lm_head = stacked([matrix_of(model.lm_head, quantize)])
            self.final_norm = StepNorm.of(model.model.norm)
            self.rotation = rotation_table(model.model.rotary_emb)
            self.embedding = model.model.embed_tokens.weight.detach()
            # One row's products from the copy that reads fastest on this machine (measured once per process)
            self.few_rows = settle_few_rows(self.matrices())

    @property
    def context_length(self):
        return self.config.max_position_embeddings

    def new_cache(self, slots, limit, capacity=256):
        """A SlotCache for this model: `slots` rows of at most `limit` tokens each."""
        config = self.config
        limit = min(limit, self.context_length)
        return SlotCache(config.num_hidden_layers, slots, config.num_key_value_heads, config.head_dim, self.dtype,
                         self.device, limit, capacity)

    def matrices(self):
        """The LinearWeights a decoding step may read, in its order (every expert of a mixture)."""
        return [m for layer in self.layers for m in (layer.qkv, layer.o, *layer.feed.matrices())] + [self.lm_head]

    def weight_bytes(self):
        """Bytes of matrices one token reads (the embedding row aside; of a mixture, its k experts)."""
        return sum(layer.qkv.nbytes() + layer.o.nbytes() + layer.feed.bytes_read() for layer in self.layers) \
            + self.lm_head.nbytes()

    def _layers(self, input_ids, rotation, store_of_layer, mask=None, is_causal=False):
        hidden = F.embedding(input_ids, self.embedding)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotation, store_of_layer(index), mask, is_causal)
        return hidden

    def _layers_of_groups(self, groups):
        """_layers of several groups (input_ids, rotation, store_of_layer, mask, is_causal) in one
        pass: their tokens side by side from the embedding to the last layer. Returns each group's
        hidden."""
        hiddens = [F.embedding(group[0], self.embedding) for group in groups]
        shapes = [hidden.shape for hidden in hiddens]
        hidden = torch.cat([hidden.reshape(1, -1, hidden.shape[-1]) for hidden in hiddens], dim=1)
        for index, layer in enumerate(self.layers):
            hidden = layer.groups(hidden, shapes, [(group[1], group[2](index), *group[3:]) for group in groups])
        pieces = hidden.split([shape.numel() // shape[-1] for shape in shapes], dim=1)
        return [piece.view(shape) for piece, shape in zip(pieces, shapes)]

    def _logits(self, hidden):
        return in_dtype(self.lm_head(self.final_norm(hidden)), torch.float32)

    @torch.inference_mode()
    def prefill(self, cache, rows, input_ids, start=0, lengths=None):
        """Feed a chunk of tokens, input_ids (n, S), to `rows` of `cache` (n slot numbers), all of
        which hold `start` tokens. Rows shorter than S are right-padded and give their real length
        in `lengths` (the padding lands in columns that decoding overwrites before it is seen).
        Returns the logits after each row's last real token, (n, vocab) float32."""
        group, done = self._prefill_group(cache, rows, input_ids, start, lengths)
        return done(self._layers(*group))

    @torch.inference_mode()
    def step(self, cache, tokens, active=None):
        """One new token for each of rows 0..B-1, tokens (B,); each row attends to its own length.
        active (B bools): rows that are not decoding (free, or half-way through a chunked prefill) are
        carried along and keep their length (what they write lies where their next tokens go).
        Returns the logits (B, vocab) float32."""
        group, done = self._step_group(cache, tokens, active)
        return done(self._layers(*group))

    @torch.inference_mode()
    def step_and_prefill(self, cache, tokens, active, rows, input_ids, start=0, lengths=None):
        """step(cache, tokens, active) and prefill(cache, rows, input_ids, start, lengths) in one pass:
        each layer's matrix products take the step's tokens and the chunk's together (PreparedLayer.groups),
        so the weights are read once (the server's engine, when a prompt arrives while others decode).
        `rows` must be inactive in the step (they ride along in it; the chunk is stored after the
        step's token, over it). Returns (the step's logits (B, vocab), the prefill's (n, vocab))."""
        prefill_group, prefill_done = self._prefill_group(cache, rows, input_ids, start, lengths)
        step_group, step_done = self._step_group(cache, tokens, active)  # after the prefill's reserve: places
        step_hidden, prefill_hidden = self._layers_of_groups([step_group, prefill_group])
        return step_done(step_hidden), prefill_done(prefill_hidden)

    def _prefill_group(self, cache, rows, input_ids, start, lengths):
        """prefill's input to the layers, and what to do with their output: -> (group, done)."""
        batch, seq_len = input_ids.shape
        lengths = [seq_len] * batch if lengths is None else list(lengths)
        cache.reserve(start + seq_len)
        rotation = self.rotation[start:start + seq_len, None]  # (S, 1, D/2): each position's turn
        mask = None
        if start > 0 and seq_len > 1:  # query i sees the `start` cached keys and new keys 0..i
            mask = torch.ones(seq_len, start + seq_len, dtype=torch.bool, device=self.device).tril(start)[None, None]

        def store_of_layer(layer):
            def store(keys_values):
                stored = cache.store_chunk(layer, rows, start, keys_values)
                if start == 0:  # a fresh row attends to the chunk alone
                    return keys_values.split(keys_values.shape[1] // 2, dim=1)
                return stored
            return store

        def done(hidden):
            cache.written(rows, start + seq_len)
            for row, length in zip(rows, lengths):
                cache.lengths[row] = start + length
            last = torch.tensor(lengths, device=self.device) - 1
            return self._logits(hidden[torch.arange(batch, device=self.device), last])

        return (input_ids, rotation, store_of_layer, mask, start == 0 and seq_len > 1), done

    def _step_group(self, cache, tokens, active):
        """step's input to the layers, and what to do with their output: -> (group, done)."""
        batch = tokens.shape[0]
        lengths = cache.lengths[:batch]
        active = [True] * batch if active is None else list(active)
        live = [length for length, on in zip(lengths, active) if on]
        width = max(live) + 1
        cache.reserve(max(lengths) + 1)
        cache.readable(batch, width)
        same_column = lengths[0] if all(length == lengths[0] for length in lengths) and all(active) else None
        mask = None
        if same_column is not None:
            columns, rotation = same_column, self.rotation[same_column]  # (D/2,): one turn for every row
        else:  # each row sees its own columns (an idle row column 0 only): -inf elsewhere
            columns = torch.tensor(lengths, device=self.device)
            rotation = self.rotation[columns][:, None]  # (B, 1, D/2)
            seen = torch.tensor([length if on else 0 for length, on in zip(lengths, active)], device=self.device)
            hidden_columns = torch.arange(width, device=self.device)[None] > seen[:, None]
            mask = torch.zeros(batch, 1, width, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill_(hidden_columns[:, None], float("-inf"))
            mask = mask.repeat_interleave(self.config.num_key_value_heads, dim=0)  # (row, head) pairs, as attention

        places = cache.token_places(batch, columns)

        def store_of_layer(layer):
            return lambda keys_values: cache.store_tokens(layer, places, keys_values, width)

        def done(hidden):
            for row, on in enumerate(active):
                if on:
                    cache.lengths[row] += 1
            return self._logits(hidden)

        return (tokens, rotation, store_of_layer, mask, False), done


def prepare(model, quantize=None):
    """The PreparedModel of `model` (made now), or `model` itself when it is prepared already (a
    PreparedModel, or llama_cpp_backend.LlamaCppModel: the same two passes, computed by llama.cpp)."""
    if isinstance(model, nn.Module):
        return PreparedModel(model, quantize)
    if quantize not in (None, model.quantize):
        raise ValueError(f"the model was prepared with quantize={model.quantize!r}, not {quantize!r}")
    return model
