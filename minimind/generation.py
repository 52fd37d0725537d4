"""Generation: prompt ids in, new tokens out, one token at a time over the key/value cache.

    minimind generate --model output/final --prompt "Velwen is"          (raw continuation)
    minimind generate --model output/final --prompt "Add 3 and 4." --chat
    minimind chat --model output/final --system "You are a concise assistant."

The loop (`decode`) is the whole algorithm: one forward pass over the prompt fills the cache
(prefill), then each step feeds only the newest token, reads the logits of the last position, and
picks the next token (`pick_next_token`: repetition penalty, temperature, top-k, top-p, or argmax
when temperature is 0). Batches of prompts of different lengths are left-padded; the attention
mask keeps padding out of attention and out of the position ids, so each row's greedy output is
the one it would get alone. `generate` adds stopping (eos, stop strings) and text; `stream_text`
yields the text of one prompt as it is produced. Model loading for the commands is
`load_for_inference`. transformers' `model.generate()` also works on the same model.
In chat, `ReplyFormatter` shows a reply's thinking (<think>...</think>) and tool calls
(<tool_call>...</tool_call>, MiniMind-3's format) apart from its answer.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .model import KVCache

# Defaults of the original MiniMind's eval script, the ones its models were tuned to sound right with.
from .cli import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P  # noqa: E402,F401


# ---------------------------------------------------------------- choosing the next token

def pick_next_token(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """logits (B, vocab) of the last position -> next token ids (B,).

    repetition_penalty p (CTRL's): for tokens already in the row (`seen`, bool (B, vocab)), a
        positive logit is divided by p and a negative one multiplied by p, so p > 1 discourages
        repeating them.
    temperature T: logits / T before the softmax; T < 1 sharpens the distribution, T > 1 flattens
        it, T = 0 means greedy (argmax), deterministic.
    top_k k: sample only among the k most likely tokens (0 = all).
    top_p p: sample only among the smallest set of most likely tokens whose probabilities add up
        to p (nucleus sampling; 1.0 = all). Cuts the long tail of unlikely tokens, adaptively.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first one always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


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


@torch.inference_mode()
def decode(model, input_ids, attention_mask=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
           top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, seed=None, pad_token_id=0, generator=None):
    """Yield the next token of every row, (B,) per step, until max_new_tokens or every row has
    produced an eos token (rows that have finished get pad_token_id from then on).

    input_ids (B, S), left-padded, with attention_mask (B, S) marking real tokens (1); an empty
    prompt (S = 0) starts from the model's bos token. eos_token_id: an id, a list of ids, or None.
    Sampling draws from `generator` when given (a run that saves its state, as GRPO does, can
    continue the same random stream), else from a fresh one seeded with `seed`.
    """
    model.eval()
    # Without padding, positions follow from the cache length: no mask to build or extend.
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    device = model_device(model)  # every input goes where the weights are
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    if input_ids.shape[1] == 0:
        input_ids = torch.full((input_ids.shape[0], 1), model.config.bos_token_id, dtype=torch.long, device=device)
        attention_mask = None
    input_ids, attention_mask, max_new_tokens = fit_to_context(
        input_ids, attention_mask, max_new_tokens, model.config.max_position_embeddings)
    batch = input_ids.shape[0]
    eos_ids = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        seen.scatter_(1, input_ids, real)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # Preallocated for the whole generation: appending a token writes it in place.
    cache = KVCache(capacity=input_ids.shape[1] + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1).logits
    for step in range(max_new_tokens):
        token = pick_next_token(logits[:, -1], seen, temperature, top_k, top_p, repetition_penalty, generator)
        token = token.masked_fill(finished, pad_token_id)
        yield token
        if eos_ids.numel():
            finished |= torch.isin(token, eos_ids)
            if bool(finished.all()):
                return
        if step == max_new_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(batch, device=device), token] = True
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits = model(token[:, None], attention_mask=attention_mask, cache=cache, use_cache=True,
                       logits_to_keep=1).logits


def model_device(model):
    """Where the model's weights are: every input goes there."""
    return next(model.parameters()).device


# ---------------------------------------------------------------- text and stop strings

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

    def push(self, token_id):
        """Add a token; return the new printable text ('' when there is none yet)."""
        self.token_ids.append(int(token_id))
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
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
             seed=None, on_text=None, generator=None):
    """Generate for a batch of prompts; see `decode` for the arguments it shares.

    input_ids: (B, S) tensor (left-padded, with attention_mask) or a list of id lists of any
    lengths (padded here). eos_token_id defaults to the tokenizer's (or the config's) eos.
    stop_strings need a tokenizer. on_text(row, piece) is called with each new piece of text
    as it is produced (streaming; needs a tokenizer).
    """
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
    streams = [TextStream(tokenizer, stop_strings) for _ in range(batch)] if tokenizer is not None else None
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
    return GenerationOutput(token_ids, texts, reasons)


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


def default_eos_ids(tokenizer, model):
    """The tokens that end a generation: the tokenizer's eos (<|im_end|>, the end of a chat turn)
    and <|endoftext|> (the end of a pretraining document); the config's eos without a tokenizer."""
    if tokenizer is None:
        return [model.config.eos_token_id]
    ids = {tokenizer.eos_token_id}
    if "<|endoftext|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------- loading a model for the commands

def load_for_inference(model_arg, tokenizer=None, adapter=None, dtype=torch.float32, device="cpu", **shape_flags):
    """Resolve a --model argument to (model in eval mode on `device`, tokenizer).

    model_arg: what training writes, `output/final/` (a Hugging Face style directory) or
    `output/model_final.pth` (config.json beside it, or shape flags such as hidden_size and
    num_hidden_layers), or a .safetensors file. The tokenizer is `tokenizer` if given, else the
    one saved with the model (in its directory, beside the file, or in `final/` beside a .pth),
    else the bundled default. shape_flags left as None are ignored. A line on stderr says which
    model family and shape was loaded.
    """
    from .checkpoint import describe_model, load_model
    from .lora import apply_adapter
    from .tokenizer import load_tokenizer

    path = Path(model_arg)
    device = resolve_inference_device(device)  # a device this machine lacks fails before any loading
    model = load_model(path, dtype=dtype, **{k: v for k, v in shape_flags.items() if v is not None})
    print(f"model: {describe_model(model.config)}, from {path}", file=sys.stderr)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    if tokenizer is None:
        tokenizer = saved_tokenizer_dir(path)
        if tokenizer is None:
            print(f"note: no tokenizer saved with {path}; using the bundled default (--tokenizer DIR to choose)",
                  file=sys.stderr)
    return model.to(device).eval(), load_tokenizer(tokenizer)


def saved_tokenizer_dir(model_path):
    """The tokenizer saved with a model: in its directory, beside the file, or in `final/` beside a
    .pth (as training writes them); None when there is none."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    return next((str(c) for c in (folder, folder / "final") if (c / "tokenizer.json").is_file()), None)


def resolve_inference_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try cpu, cuda or cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


SHAPE_FLAGS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "num_key_value_heads": "num_key_value_heads"}


def model_from_args(args, dtype=None):
    """The model and tokenizer that the inference verbs' --model ... --device flags name (cli.py);
    in --dtype unless `dtype` is given."""
    shape = {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items()}
    if args.use_moe is not None:
        shape["use_moe"] = bool(args.use_moe)
    if getattr(args, "num_threads", None):
        torch.set_num_threads(args.num_threads)
    dtype = getattr(torch, args.dtype) if dtype is None else dtype
    return load_for_inference(args.model, args.tokenizer, args.adapter, dtype=dtype, device=args.device, **shape)


def sampling_from_args(args):
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop_strings=args.stop)


def encode_chat(tokenizer, messages, open_thinking=False):
    """Messages -> prompt ids through the tokenizer's chat template, ending with the assistant header.
    open_thinking: MiniMind-3's template then ends the prompt inside an open <think> block, so the
    model reasons first (without it, that template closes an empty one); other templates ignore it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         open_thinking=open_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def ends_inside_thinking(tokenizer, prompt_ids):
    """Whether a chat prompt leaves a <think> block open: the reply then starts with thinking."""
    text = tokenizer.decode(prompt_ids[-8:]).rstrip("\n")
    return text.endswith(THINK_OPEN)


# ---------------------------------------------------------------- showing thinking and tool calls

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
DIM, RESET = "\033[2m", "\033[0m"


def describe_tool_call(body):
    """'{"name": "f", "arguments": {"x": 1}}' -> 'tool call: f({"x": 1})'; other text as it is."""
    try:
        call = json.loads(body)
        name, arguments = call["name"], call.get("arguments", {})
    except (ValueError, KeyError, TypeError):
        return f"tool call: {body.strip()}"
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f"tool call: {name}({arguments})"


class ReplyFormatter:
    """A reply's text for display, fed piece by piece as it streams: thinking as `thinking: ...` (dimmed
    when `dim`) ending its line, each <tool_call>{json}</tool_call> as `tool call: name(arguments)` on a
    line of its own, the answer as it is. An empty think block shows nothing. A tail that could be
    the start of a tag is held back until the next piece tells; a tool call shows once complete.

    thinking: the reply starts inside a think block (the prompt opened it)."""

    def __init__(self, dim=False, thinking=False):
        self.dim, self.pending = dim, ""
        self.state = "thinking" if thinking else "answer"  # or "tool call", "after thinking"
        self.thought = False      # whether the current think block has shown text yet
        self.line_start = True    # whether the text shown so far ends a line

    def push(self, piece):
        self.pending += piece
        out = []
        while True:
            if self.state == "tool call":
                end = self.pending.find(CALL_CLOSE)
                if end < 0:
                    return "".join(out)
                out.append(self.emit(self.call_line(self.pending[:end])))
                self.pending, self.state = self.pending[end + len(CALL_CLOSE):], "answer"
                continue
            found = [(self.pending.find(tag), tag) for tag in (THINK_OPEN, THINK_CLOSE, CALL_OPEN) if tag in self.pending]
            if not found:
                break
            position, tag = min(found)
            before = self.pending[:position]
            out.append(self.emit(self.show(before.rstrip("\n") if tag == THINK_CLOSE else before)))
            self.pending = self.pending[position + len(tag):]
            out.append(self.emit(self.enter(tag)))
        tags = (THINK_OPEN, THINK_CLOSE, CALL_OPEN)
        keep = max((n for tag in tags for n in range(1, len(tag)) if self.pending.endswith(tag[:n])), default=0)
        shown = self.pending[:len(self.pending) - keep]
        if self.state == "thinking":  # newlines that may end the think block are held back too
            shown = shown.rstrip("\n")
        shown, self.pending = shown, self.pending[len(shown):]
        out.append(self.emit(self.show(shown)))
        return "".join(out)

    def finish(self):
        """The rest at the end of the reply (the text of an unclosed tool call or think block included)."""
        rest, self.pending = self.pending, ""
        if self.state == "tool call":
            self.state = "answer"
            return self.emit(self.call_line(rest))
        if self.state != "thinking":
            return self.emit(self.show(rest))
        return self.emit(self.show(rest.rstrip("\n"))) + self.emit(self.enter(THINK_CLOSE))

    def emit(self, text):
        if text:
            self.line_start = text.endswith("\n")
        return text

    def show(self, text):
        """Plain text in the current state."""
        if self.state == "after thinking":  # the template's blank line after </think>
            text = text.lstrip("\n")
            self.state = "answer" if text else self.state
        elif self.state == "thinking" and not self.thought:
            text = text.lstrip("\n")
            if text:
                self.thought = True
                text = (DIM if self.dim else "") + "thinking: " + text
        return text

    def enter(self, tag):
        """What a tag shows as it changes the state."""
        if tag == THINK_OPEN:
            self.state, self.thought = "thinking", False
        elif tag == THINK_CLOSE and self.state == "thinking":
            self.state = "after thinking"
            return (RESET if self.dim else "") + "\n" if self.thought else ""
        elif tag == CALL_OPEN:
            self.state = "tool call"
        return ""

    def call_line(self, body):
        return ("" if self.line_start else "\n") + describe_tool_call(body)


# ---------------------------------------------------------------- minimind generate

def main_generate(args):
    """minimind generate (flags parsed in cli.py)."""
    sampling = sampling_from_args(args)
    model, tokenizer = model_from_args(args)
    formatter = None
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt_ids = encode_chat(tokenizer, messages, args.open_thinking)
        formatter = ReplyFormatter(dim=sys.stdout.isatty(), thinking=ends_inside_thinking(tokenizer, prompt_ids))
    else:
        prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        sys.stdout.write(args.prompt)
    try:
        for piece in stream_text(model, tokenizer, prompt_ids, **sampling):
            sys.stdout.write(formatter.push(piece) if formatter else piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    sys.stdout.write((formatter.finish() if formatter else "") + "\n")
    return 0


# ---------------------------------------------------------------- minimind chat

def trim_history(tokenizer, messages, max_tokens, open_thinking=False):
    """Drop the oldest turns (keeping a system message) until the rendered prompt fits max_tokens.

    Returns the kept messages and their prompt ids; the last user message is always kept (if it
    alone is too long, `decode` keeps its end)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = encode_chat(tokenizer, system + turns, open_thinking)
        if len(ids) <= max_tokens or len(turns) <= 1:
            return system + turns, ids
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]


def main_chat(args):
    """minimind chat (flags parsed in cli.py)."""
    sampling = sampling_from_args(args)
    model, tokenizer = model_from_args(args)
    context = min(args.max_seq_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    sampling["max_new_tokens"] = min(sampling["max_new_tokens"], context // 2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line == "/exit":
                break
            if line == "/reset":
                history = []
                print("(conversation reset)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            kept, prompt_ids = trim_history(tokenizer, system + history, context - sampling["max_new_tokens"],
                                            args.open_thinking)
            history = kept[len(system):]
            if interactive:
                sys.stdout.write("assistant> ")
            reply = []
            # thinking and tool calls shown apart; the history keeps the reply's own text
            formatter = ReplyFormatter(dim=sys.stdout.isatty(), thinking=ends_inside_thinking(tokenizer, prompt_ids))
            for piece in stream_text(model, tokenizer, prompt_ids, **sampling):
                reply.append(piece)
                sys.stdout.write(formatter.push(piece))
                sys.stdout.flush()
            sys.stdout.write(formatter.finish() + "\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(reply)})
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    return 0
