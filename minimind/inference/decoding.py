"""Decoding: prompt ids in, new tokens out, one token at a time over the key/value cache.

The loop (`decode`) is the whole algorithm: one forward pass over the prompt fills the cache
(prefill), then each step feeds only the newest token, reads the logits of the last position, and
picks the next token (sampling.pick_next_token: repetition penalty, temperature, top-k, top-p, or
argmax when temperature is 0). Batches of prompts of different lengths are left-padded; the
attention mask keeps padding out of attention and out of the position ids, so each row's greedy
output is the one it would get alone; rows that have met eos leave the steps (drop_finished).
`generate` adds stopping (eos, stop strings) and text; `stream_text` yields the text of one
prompt as it is produced. transformers' `model.generate()` also works on the same model.
"""
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..data.tokenizer import default_eos_ids
from .prepared import prepare
from .sampling import pick_next_token
from .settings import DEFAULT_MAX_NEW_TOKENS

# ---------------------------------------------------------------- the decode loop

def fit_to_context(input_ids, attention_mask, max_new_tokens, context_length, warn=True):
    """Keep the last tokens of over-long prompts so that prompt + max_new_tokens fits the context."""
    max_new_tokens = min(max_new_tokens, context_length - 1)
    room = context_length - max_new_tokens
    if input_ids.shape[1] > room:
        if warn:
            print(f"warning: the prompt has {input_ids.shape[1]} tokens; keeping its last {room} so that "
                  f"{max_new_tokens} new tokens fit the context of {context_length}", file=sys.stderr)
        input_ids = input_ids[:, -room:]
        attention_mask = attention_mask[:, -room:] if attention_mask is not None else None
    return input_ids, attention_mask, max_new_tokens


def decode(model, input_ids, attention_mask=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
           top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, seed=None, pad_token_id=0, generator=None,
           quantize=None):
    """Yield the next token of every row, (B,) per step, until max_new_tokens or every row has
    produced an eos token (rows that have finished get pad_token_id from then on).

    model: a MiniMindForCausalLM, prepared here (with int8 weights if quantize="int8"), or a
    prepared.PreparedModel, used as it is. input_ids (B, S), left-padded, with attention_mask (B, S)
    marking real tokens (1); an empty prompt (S = 0) starts from the model's bos token.
    eos_token_id: an id, a list of ids, or None. Sampling draws from `generator` when given (a run
    that saves its state, as GRPO does, can continue the same random stream), else from a fresh one
    seeded with `seed`.
    """
    with gathered(model):
        yield from decode_prepared(prepare(model, quantize), input_ids, attention_mask, max_new_tokens,
                                   temperature, top_k, top_p, repetition_penalty, eos_token_id, seed, pad_token_id,
                                   generator)


@contextmanager
def gathered(model):
    """A model that FSDP shards (GRPO under --fsdp) whole on every rank for the time of a decode.
    Every rank gathers it together (one collective each, as every rank samples its answers), and
    the decode then needs no collective: the ranks' answers may end at different steps. The
    gathering runs under no_grad: FSDP's gathered weights cannot be inference tensors."""
    from torch.distributed.fsdp import FSDPModule  # here: only training under torchrun needs it
    shards = [module for module in model.modules() if isinstance(module, FSDPModule)] \
        if isinstance(model, torch.nn.Module) else []
    with torch.no_grad():
        for module in shards:
            module.unshard()
    try:
        yield
    finally:
        for module in shards:
            module.reshard()


@torch.inference_mode()
def decode_prepared(prepared, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                    repetition_penalty, eos_token_id, seed, pad_token_id, generator):
    """decode's loop over a PreparedModel."""
    prepared.model.eval()
    device = prepared.device  # every input goes where the weights are (after the rows are cut out here)
    if input_ids.shape[1] == 0:
        input_ids, attention_mask = input_ids.new_full((input_ids.shape[0], 1), prepared.config.bos_token_id), None
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    input_ids, attention_mask, max_new_tokens = fit_to_context(
        input_ids, attention_mask, max_new_tokens, prepared.context_length)
    prompts = [ids[real.bool()] for ids, real in zip(input_ids, attention_mask)]
    prompts = [ids if len(ids) else input_ids.new_full((1,), prepared.config.bos_token_id) for ids in prompts]
    batch = len(prompts)
    eos_ids = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, prepared.config.vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            seen[row, ids.to(device)] = True
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # One row per prompt, each from column 0 (right-padded for the one prefill pass); room for the
    # whole generation from the start, so no step copies the cache. A prompt that several rows share
    # (a GRPO group) is prefilled once and its cache row copied.
    width = max(len(ids) for ids in prompts) + max_new_tokens
    cache = prepared.new_cache(batch, width, capacity=width)
    first_row = {}
    sources = [first_row.setdefault(tuple(ids.tolist()), row) for row, ids in enumerate(prompts)]
    distinct = sorted(set(sources))
    threads = getattr(prepared, "threads", None)  # llama_cpp_backend.LlamaCppModel chooses its own
    if threads is not None:
        threads.use_all()
    logits = prepared.prefill(cache, distinct, right_pad([prompts[row] for row in distinct], pad_token_id).to(device),
                              lengths=[len(prompts[row]) for row in distinct])
    if len(distinct) < batch:
        copies = [row for row in range(batch) if sources[row] != row]
        cache.copy_rows([sources[row] for row in copies], copies)
        logits = logits[torch.tensor([distinct.index(source) for source in sources], device=device)]
    rows = torch.arange(batch, device=device)  # the prompt each of the cache's rows 0..n-1 decodes
    try:
        for step in range(max_new_tokens):
            # One uniform number per prompt, finished or not: each row draws what it would in the whole batch
            uniforms = torch.rand(batch, generator=generator, device=device) if temperature > 0 else None
            if uniforms is not None and len(rows) < batch:
                uniforms = uniforms[rows]
            token = pick_next_token(logits, seen, temperature, top_k, top_p, repetition_penalty, generator, uniforms)
            tokens = token if len(rows) == batch else token.new_full((batch,), pad_token_id).index_copy_(0, rows, token)
            yield tokens.masked_fill(finished, pad_token_id)
            if eos_ids.numel():
                finished |= torch.isin(tokens, eos_ids)
                if bool(finished.all()):
                    return
            if step == max_new_tokens - 1:
                return
            if seen is not None:
                seen[torch.arange(len(rows), device=device), token] = True
            if eos_ids.numel() and batch > 1:
                rows, token, seen = drop_finished(cache, rows, token, seen, finished)
            if threads is None:
                logits = prepared.step(cache, token)
            else:
                logits = threads.timed(len(rows), lambda: prepared.step(cache, token))
    finally:
        if threads is not None:
            threads.use_all()  # the process's threads as they were found


def drop_finished(cache, rows, token, seen, finished):
    """Once a quarter of the decoding rows have finished, the others move up to the cache's first
    rows and the steps decode those alone: a finished row costs a step as much as a live one (in a
    GRPO rollout of a trained model 30% of the rows' steps came after their eos). Returns (rows,
    token, seen) of the rows that go on."""
    keep = (~finished[rows]).nonzero().flatten()
    if len(keep) > len(rows) * 3 // 4 or len(keep) == 0:
        return rows, token, seen
    moved = [(source, target) for target, source in enumerate(keep.tolist()) if source != target]
    if moved:  # rows already at the top stay where they are
        cache.copy_rows([source for source, _ in moved], [target for _, target in moved])
    return rows[keep], token[keep], None if seen is None else seen[keep]


def right_pad(sequences, pad_token_id=0):
    """A list of 1-d id tensors -> (B, S_max), each row from column 0, padded on the right."""
    length = max(len(ids) for ids in sequences)
    padded = sequences[0].new_full((len(sequences), length), pad_token_id)
    for row, ids in enumerate(sequences):
        padded[row, :len(ids)] = ids
    return padded


def model_device(model):
    """Where the model's weights are: every input goes there."""
    return next(model.parameters()).device


# ---------------------------------------------------------------- text and stop strings

COMMIT_EVERY = 32  # tokens between the points where TextStream keeps the text decoded so far


def decodes_additively(tokenizer):
    """Whether decode(a) + decode(b) == decode(a + b) whenever a's text ends on a whole character:
    true of byte-level BPE (the bytes of a and b, one after the other) without clean-up of spaces
    before punctuation, which may join across the cut. Checked for the bundled tokenizer on 6,086
    cuts of mixed English, Chinese, emoji and random tokens (tests/test_generation.py checks it too)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel" and not getattr(tokenizer, "clean_up_tokenization_spaces", True)


class TextStream:
    """The text of one row's generated tokens, given out in pieces that are safe to print.

    Byte-level tokens can split a character (a Chinese character, an emoji) across tokens; until
    the rest arrives the decoded text ends in U+FFFD, so nothing is given out then. With stop
    strings, a tail that could be the start of one is held back, and a stop string ends the text
    (it is not part of it).
    """

    def __init__(self, tokenizer, stop_strings=None):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.token_ids, self.text, self.given_out, self.stopped = [], "", 0, False
        # The text of token_ids[:committed_tokens], kept so that a push decodes only the tokens after
        # it: decoding the whole reply at every token cost 0.4 ms a token at 2,000 tokens. Only where
        # decoded pieces add up (decodes_additively); otherwise nothing is committed and all is decoded.
        self.additive = decodes_additively(tokenizer)
        self.committed_text, self.committed_tokens = "", 0

    def push(self, token_id):
        """Add a token; return the new printable text ('' when there is none yet)."""
        self.token_ids.append(int(token_id))
        tail = self.tokenizer.decode(self.token_ids[self.committed_tokens:], skip_special_tokens=True)
        if tail.endswith("\ufffd"):
            return ""
        text = self.committed_text + tail
        if self.additive and len(self.token_ids) - self.committed_tokens >= COMMIT_EVERY:
            self.committed_text, self.committed_tokens = text, len(self.token_ids)  # ends on a whole character
        self.text = text
        stops = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if stops:
            self.text, self.stopped = text[:min(stops)], True
            return self.finish()
        return self._give_out(len(text) - self._partial_stop_length(text))

    def finish(self):
        """The rest of the text, held-back parts included."""
        return self._give_out(len(self.text))

    def _give_out(self, end):
        piece = self.text[self.given_out:end] if end > self.given_out else ""
        self.given_out = max(self.given_out, end)
        return piece

    def _partial_stop_length(self, text):
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


@dataclass
class GenerationOutput:
    """token_ids: the new tokens of each row (eos excluded); texts: their text (stop strings
    removed) when a tokenizer was given; finish_reasons: 'eos', 'stop' (a stop string) or 'length'."""
    token_ids: list
    texts: list = None
    finish_reasons: list = field(default_factory=list)


def generate(model, input_ids, attention_mask=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
             top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, stop_strings=None, tokenizer=None,
             seed=None, on_text=None, generator=None, quantize=None):
    """Generate for a batch of prompts; see `decode` for the arguments it shares.

    input_ids: (B, S) tensor (left-padded, with attention_mask) or a list of id lists of any
    lengths (padded here). eos_token_id defaults to the tokenizer's (or the config's) eos.
    stop_strings need a tokenizer. on_text(row, piece) is called with each new piece of text
    as it is produced (streaming; needs a tokenizer).
    """
    with gathered(model):  # a model FSDP shards: whole while it is prepared and decodes
        model = prepare(model, quantize)
        if not torch.is_tensor(input_ids):
            # An empty prompt starts from the bos token, as it would alone (see `decode`).
            input_ids = [list(ids) or [model.config.bos_token_id] for ids in input_ids]
            input_ids, attention_mask = left_pad(input_ids, pad_token_id=model.config.pad_token_id or 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if eos_token_id is None:
            eos_token_id = default_eos_ids(tokenizer, model)
        if (stop_strings or on_text) and tokenizer is None:
            raise ValueError("stop_strings and on_text need the tokenizer")
        batch = input_ids.shape[0]
        eos_set = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        token_ids = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        # Text as it comes only where it is needed (stop strings, on_text); otherwise each row's text is
        # decoded once at the end (final_text): one decode a token was 9% of a GRPO rollout.
        streams = [TextStream(tokenizer, stop_strings) for _ in range(batch)] \
            if tokenizer is not None and (stop_strings or on_text) else None
        active = [True] * batch
        for step_tokens in decode(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                                  repetition_penalty, eos_token_id, seed, model.config.pad_token_id or 0, generator):
            for row, token in enumerate(step_tokens.tolist()):
                if not active[row]:
                    continue
                if token in eos_set:
                    active[row], reasons[row] = False, "eos"
                    continue
                token_ids[row].append(token)
                if streams is not None:
                    piece = streams[row].push(token)
                    if piece and on_text:
                        on_text(row, piece)
                    if streams[row].stopped:
                        active[row], reasons[row] = False, "stop"
            if not any(active):
                break
        texts = None
        if streams is not None:
            for row, stream in enumerate(streams):
                piece = stream.finish()
                if piece and on_text:
                    on_text(row, piece)
            texts = [stream.text for stream in streams]
        elif tokenizer is not None:
            texts = [final_text(tokenizer, ids) for ids in token_ids]
        return GenerationOutput(token_ids, texts, reasons)


def final_text(tokenizer, token_ids, look_back=8):
    """The text a TextStream without stop strings holds after token_ids were pushed one by one: the
    decoded text of the longest start of token_ids whose text does not end in a partial character
    (U+FFFD), found from the end in a few decodes; a longer run of such ends (bytes that never make a
    character) is replayed through a TextStream."""
    for end in range(len(token_ids), max(len(token_ids) - look_back, 0), -1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text
    if len(token_ids) <= look_back:
        return ""
    stream = TextStream(tokenizer)
    for token in token_ids:
        stream.push(token)
    return stream.text


def stream_text(model, tokenizer, input_ids, **kwargs):
    """Yield the text of one prompt's continuation piece by piece as it is generated.

    input_ids: a list of ids or a (1, S) tensor; kwargs as for `generate`.
    """
    if torch.is_tensor(input_ids):
        input_ids = input_ids.reshape(-1).tolist()
    eos = kwargs.pop("eos_token_id", None)
    eos_set = set(default_eos_ids(tokenizer, model) if eos is None else [eos] if isinstance(eos, int) else eos)
    stream = TextStream(tokenizer, kwargs.pop("stop_strings", None))
    for step_tokens in decode(model, torch.tensor([input_ids], dtype=torch.long), eos_token_id=list(eos_set), **kwargs):
        token = int(step_tokens[0])
        if token in eos_set:
            break
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    piece = stream.finish()
    if piece:
        yield piece


def left_pad(sequences, pad_token_id=0):
    """A list of id lists -> input_ids (B, S_max) padded on the left, attention_mask (B, S_max)."""
    length = max((len(ids) for ids in sequences), default=0)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, length - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
    return input_ids, attention_mask
