"""Continuous batching: requests that arrive together are decoded together over one key/value cache.

One thread owns the model and repeats `step`:
  1. admit: waiting requests join while the batch has room. Their prompts go through one prefill
     pass (left-padded, as in decoding.generate), each picks its first token, and their cache
     rows join the running batch (`BatchCache.join`);
  2. decode: one forward pass feeds the newest token of every running row and gives one row of
     logits each; every row picks its next token with its own sampling settings (and generator);
  3. hand out: each row's new text goes to its request (TextStream: whole characters only, stop
     strings held back and cut), and rows that finished (eos, a stop string, max tokens) or were
     cancelled (a client went away) leave the batch (`BatchCache.keep_rows`).

Rows are right-aligned in the cache: every row's newest token is in the last column and shorter
rows are padded on the left; the attention mask hides the padding and position ids count from each
row's first real token (model/model.py), which is how a left-padded batch decodes in decoding.decode.
So a greedy request gets the tokens it would get alone, whichever requests share its batch.

Bounded memory: at most `max_batch_size` rows of at most `context_length` tokens each, and at most
`max_queue` requests waiting; `submit` refuses more with QueueFull.
"""
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass

import torch

from ...data.tokenizer import default_eos_ids
from ...model.model import KVCache
from ..decoding import TextStream, left_pad
from ..sampling import pick_next_token

# Prompts admitted in one step are prefilled together while the padded batch holds at most this
# many tokens; a longer prompt is prefilled alone (no padding, so no explicit attention mask).
PREFILL_TOKEN_BUDGET = 4096


@dataclass
class Update:
    """What a request hears from the engine: new text (maybe ''), the count of tokens generated so
    far, and, in its last update, finish_reason ('stop': eos or a stop string; 'length': max tokens
    or the context is full) or error."""
    text: str
    completion_tokens: int
    finish_reason: str = None
    error: str = None


class QueueFull(Exception):
    """The waiting queue is at its bound; the request was not taken."""


class Job:
    """One request inside the engine: prompt, settings, progress, and where its updates go.

    on_update(Update) is called from the engine's thread; it must return quickly.
    """

    def __init__(self, prompt_ids, params, on_update, tokenizer, max_new_tokens, device):
        self.prompt_ids, self.params, self.on_update = list(prompt_ids), params, on_update
        self.max_new_tokens = max_new_tokens
        self.token_ids, self.finish_reason, self.cancelled = [], None, False
        self.stream = TextStream(tokenizer, params.stop_strings)
        self.generator = (torch.Generator(device=device).manual_seed(params.seed % 2**64)
                          if params.seed is not None else None)
        self.seen = None  # (1, vocab) bool: tokens of the prompt and the output, for repetition_penalty
        self.greedy = params.temperature <= 0 and params.repetition_penalty == 1.0

    @property
    def done(self):
        return self.cancelled or self.finish_reason is not None

    def tell(self, update):
        try:
            self.on_update(update)
        except Exception:  # a listener that fails (its event loop closed) means nobody is listening
            self.cancelled = True


class BatchCache(KVCache):
    """A KVCache whose rows can join and leave between decode steps.

    All rows share one width W (the widest row); a row of n real tokens has W - n zero columns on
    its left. attention_mask (B, W) marks the real positions; the model reads it for position ids
    and the attention mask, as for any left-padded batch. No row is longer than the context, so
    neither is W, and buffers never grow beyond `limit` (the context) columns.
    """

    def __init__(self, limit):
        super().__init__(capacity=0)
        self.limit, self.attention_mask = limit, None

    @property
    def rows(self):
        return 0 if self.attention_mask is None else self.attention_mask.shape[0]

    def mask_with_new_column(self):
        """The mask once one more token is appended to every row: what the next forward pass needs.
        Full buffers are re-stacked here, before KVCache.update would double them past the limit."""
        if self.lengths[0] == self.keys[0].shape[2]:
            self._assemble([(self.keys, self.values, self.attention_mask)])
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(self.rows, 1)], dim=1)
        return self.attention_mask

    def join(self, cache, attention_mask):
        """Add the rows of a prefill cache (its mask (n, P)) after the running rows."""
        parts = [(self.keys, self.values, self.attention_mask)] if self.rows else []
        self._assemble(parts + [(cache.keys, cache.values, attention_mask)])

    def keep_rows(self, rows):
        """Keep only these rows (in this order), and drop the left columns none of them uses."""
        if not rows:
            self.keys, self.values, self.lengths, self.attention_mask = [], [], [], None
            return
        index = torch.tensor(rows, device=self.attention_mask.device)
        mask = self.attention_mask[index]
        first_used = int(mask.any(dim=0).long().argmax())
        width = mask.shape[1]
        keys = [k[index, :, first_used:width] for k in self.keys]
        values = [v[index, :, first_used:width] for v in self.values]
        self._assemble([(keys, values, mask[:, first_used:])])

    def _assemble(self, parts):
        """Stack the rows of several caches into fresh buffers, right-aligned to the widest.

        parts: (keys per layer, values per layer, mask (n, w)) with buffers (n, G, >= w, D). The
        padding is zeros, not uninitialised memory: a masked key gets weight 0, and 0 * NaN would
        still be NaN. Buffers get room for as many tokens again (up to the limit), so decoding appends
        in place.
        """
        width = max(mask.shape[1] for _, _, mask in parts)
        rows = sum(mask.shape[0] for _, _, mask in parts)
        capacity = max(min(2 * width, self.limit), width)
        stacked = ([], [])
        for layer in range(len(parts[0][0])):
            for which, out in enumerate(stacked):
                first = parts[0][which][layer]
                buffer = first.new_zeros(rows, first.shape[1], capacity, first.shape[3])
                row = 0
                for part in parts:
                    count, used = part[2].shape
                    buffer[row:row + count, :, width - used:width] = part[which][layer][:, :, :used]
                    row += count
                out.append(buffer)
        self.keys, self.values = stacked
        self.lengths = [width] * len(self.keys)
        self.attention_mask = torch.cat(
            [torch.nn.functional.pad(mask, (width - mask.shape[1], 0)) for _, _, mask in parts])


class BatchingEngine:
    """Owns the model; decodes every admitted request in one running batch (see the module docstring).

    Use from any thread: `submit` a prompt, get updates through its callback, `cancel` it when its
    client leaves. `start` runs `step` in a background thread; tests may call `step` themselves.
    """

    def __init__(self, model, tokenizer, max_batch_size=16, max_queue=64, context_length=None):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.context_length = min(context_length or model.config.max_position_embeddings,
                                  model.config.max_position_embeddings)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos_ids = set(default_eos_ids(tokenizer, model))
        self.pad_token_id = model.config.pad_token_id or 0
        self.waiting, self.running = deque(), []  # running: jobs in the order of the cache's rows
        self.cache = BatchCache(self.context_length)
        self.condition = threading.Condition()
        self.stats = {"largest_batch": 0, "steps": 0, "finished": 0, "cancelled": 0}
        self.thread, self.stopping = None, False

    # ------------------------------------------------------------ the interface for requests

    def submit(self, prompt_ids, params, on_update):
        """Queue a request; returns its Job. Raises QueueFull when max_queue requests already wait,
        ValueError when the prompt leaves no room for a new token in the context."""
        prompt_ids = list(prompt_ids) or [self.model.config.bos_token_id]  # as decoding.decode
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        job = Job(prompt_ids, params, on_update, self.tokenizer, min(params.max_new_tokens, room), self.device)
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.running)} requests are being answered and {len(self.waiting)} "
                                f"wait (the queue's bound, --max_queue); try again shortly")
            self.waiting.append(job)
            self.condition.notify()
        return job

    def cancel(self, job):
        """Stop working on a job: a waiting one leaves the queue now, a running one at the end of the
        current step. Harmless for a job that already finished."""
        with self.condition:
            if job.done:
                return
            job.cancelled = True
            self.stats["cancelled"] += 1
            if job in self.waiting:
                self.waiting.remove(job)

    def status(self):
        return {"running": len(self.running), "waiting": len(self.waiting), "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "context_length": self.context_length, **self.stats}

    def start(self):
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._run, name="minimind-engine", daemon=True)
            self.thread.start()

    def stop(self):
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _run(self):
        while True:
            with self.condition:
                while not (self.stopping or self.waiting or self.running):
                    self.condition.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as error:  # a failed step fails its batch, not the server
                traceback.print_exc(file=sys.stderr)
                self._fail(self.running, f"generation failed: {type(error).__name__}: {error}")
                self.running, self.cache = [], BatchCache(self.context_length)
        with self.condition:
            self._fail(self.running + list(self.waiting), "the server is shutting down")
            self.running, self.cache = [], BatchCache(self.context_length)
            self.waiting.clear()

    # ------------------------------------------------------------ one step of the batch

    def step(self):
        """Admit waiting requests, then decode one token for every running row."""
        self._admit()
        self._drop_done()
        if self.running:
            self._decode_step()
            self._drop_done()
        self.stats["steps"] += 1

    @torch.inference_mode()
    def _admit(self):
        jobs = self._take_waiting()
        if not jobs:
            return
        input_ids, attention_mask = left_pad([job.prompt_ids for job in jobs], self.pad_token_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        for job in jobs:
            if job.params.repetition_penalty != 1.0:
                job.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                job.seen[0, job.prompt_ids] = True
        cache = KVCache(capacity=input_ids.shape[1])
        try:
            logits = self.model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        except Exception as error:  # these requests fail; the running batch, untouched, goes on
            traceback.print_exc(file=sys.stderr)
            return self._fail(jobs, f"generation failed: {type(error).__name__}: {error}")
        self.cache.join(cache, attention_mask)
        self.running += jobs
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.running))
        for job, token in zip(jobs, self._pick(jobs, logits)):
            self._accept(job, token)

    def _take_waiting(self):
        """The waiting jobs that fit: free rows, and the prefill budget for the padded prompts."""
        jobs, longest = [], 0
        with self.condition:
            while self.waiting and len(self.running) + len(jobs) < self.max_batch_size:
                longest_after = max(longest, len(self.waiting[0].prompt_ids))
                if jobs and (len(jobs) + 1) * longest_after > PREFILL_TOKEN_BUDGET:
                    break
                jobs.append(self.waiting.popleft())
                longest = longest_after
        return jobs

    @torch.inference_mode()
    def _decode_step(self):
        tokens = torch.tensor([[job.token_ids[-1]] for job in self.running], device=self.device)
        logits = self.model(tokens, attention_mask=self.cache.mask_with_new_column(), cache=self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        for job, token in zip(self.running, self._pick(self.running, logits)):
            self._accept(job, token)

    def _pick(self, jobs, logits):
        """Next token of each row: one argmax for the greedy rows, pick_next_token with its own
        settings and generator for each other row (as decoding.decode does for a batch of one)."""
        tokens = logits.float().argmax(dim=-1)
        for row, job in enumerate(jobs):
            if not job.greedy:
                p = job.params
                tokens[row] = pick_next_token(logits[row:row + 1], job.seen, p.temperature, p.top_k, p.top_p,
                                              p.repetition_penalty, job.generator)[0]
        return tokens.tolist()

    def _accept(self, job, token):
        """Give a row's new token to its job: text out, and whether it is finished."""
        if job.done:
            return
        if token in self.eos_ids:
            return self._finish(job, "stop", job.stream.finish())
        job.token_ids.append(token)
        if job.seen is not None:
            job.seen[0, token] = True
        piece = job.stream.push(token)
        if job.stream.stopped:
            return self._finish(job, "stop", piece)
        if len(job.token_ids) >= job.max_new_tokens:
            return self._finish(job, "length", piece + job.stream.finish())
        if piece:
            job.tell(Update(piece, len(job.token_ids)))

    def _finish(self, job, reason, piece):
        job.finish_reason = reason
        self.stats["finished"] += 1
        job.tell(Update(piece, len(job.token_ids), finish_reason=reason))

    def _drop_done(self):
        keep = [row for row, job in enumerate(self.running) if not job.done]
        if len(keep) < len(self.running):
            self.running = [self.running[row] for row in keep]
            self.cache.keep_rows(keep)

    def _fail(self, jobs, message):
        for job in jobs:
            if not job.done:
                job.finish_reason = "error"
                job.tell(Update("", len(job.token_ids), error=message))
