"""Continuous batching: the server's scheduler over the decoder's two passes (prepared.PreparedModel's
`prefill` and `step`, the passes `generate` decodes with).

One thread owns the model and repeats `step`:
  1. admit: waiting requests take free rows of the cache (at most `max_batch_size` rows);
  2. prefill: prompts enter the cache in chunks, within a budget of work per step
     (`prefill_chunk` tokens' worth, attention over the cached keys counted in; `chunk_tokens`).
     Shortest remaining prompt first: a short request is prefilled whole in the next step
     even while a long prompt is half-way, and prompts that fit together go in one pass. A prompt
     whose last chunk is in picks its first token from that pass's logits;
  3. decode: one pass feeds the newest token of every row that is decoding and gives one row of
     logits each; each row picks its next token with its own sampling settings (and generator).
     Rows half-way through their prompt, or free, ride along idle (PreparedModel.step);
  4. hand out: each row's new text goes to its request (TextStream: whole characters only, stop
     strings held back and cut), and rows that finished (eos, a stop string, max tokens) or were
     cancelled (a client went away) give their row back.

So a long prompt costs the running rows a slice of each step's time, never the whole prefill: with
the default budget a step takes a fraction of a second on a laptop CPU while a 20,000-token
prompt is read (docs/serving.md has the measurements). A row's keys stay where they are from its
first token to its last (kv_cache.SlotCache), and a greedy request gets the tokens it would get
alone, whichever requests share its batch and however its prompt was chunked.

Bounded memory: at most `max_batch_size` rows of at most `context_length` tokens in the cache,
`max_queue` requests waiting; `submit` refuses more with QueueFull.
"""
import math
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import torch

from ...data.tokenizer import default_eos_ids
from ..decoding import TextStream, right_pad
from ..prepared import prepare
from ..sampling import greedy_tokens, pick_next_token
from ..threads import ThreadPolicy

# Work per step for prefill, in tokens of a prompt's start (where attention costs little). A step of
# this many tokens took ~0.2 s for the 26M model on 2 laptop cores: short enough that a request
# waits at most that long for a long prompt being read, long enough that matrix products stay
# efficient.
DEFAULT_PREFILL_CHUNK = 512


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

    on_update(Update) is called from the engine's thread; it must return quickly. `slot` is its row
    of the cache once admitted, `prefilled` how many prompt tokens are in it; times are
    time.monotonic() of submission, first token and end.
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
        self.slot, self.prefilled = None, 0
        self.submitted, self.first_token_at, self.finished_at = time.monotonic(), None, None

    @property
    def done(self):
        return self.cancelled or self.finish_reason is not None

    @property
    def decoding(self):
        return self.prefilled == len(self.prompt_ids) and not self.done

    def tell(self, update):
        try:
            self.on_update(update)
        except Exception:  # a listener that fails (its event loop closed) means nobody is listening
            self.cancelled = True


def attention_keys_per_token(config):
    """How many cached keys cost a new token as much attention as its matrix products cost it:
    matrix multiply-adds per token (q, k, v, o and the feed-forward of every layer) over attention
    multiply-adds per cached key (q.k and p.v, every head of every layer). ~2,750 for the 26M model."""
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                         config.num_key_value_heads, config.head_dim)
    width = config.moe_intermediate_size * config.num_experts_per_tok if config.use_moe else config.intermediate_size
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * width
    return per_layer / (2 * heads * head_dim)


def chunk_tokens(start, budget, keys_per_token):
    """The most prompt tokens S to prefill after `start` cached ones within `budget`, where token i
    of the chunk costs 1 + (start + i) / keys_per_token: S (1 + start/k) + S^2 / 2k <= budget."""
    linear = 1 + start / keys_per_token
    return max(1, int(keys_per_token * (math.sqrt(linear ** 2 + 2 * budget / keys_per_token) - linear)))


class BatchingEngine:
    """Owns the model; decodes every admitted request in one running batch (see the module docstring).

    Use from any thread: `submit` a prompt, get updates through its callback, `cancel` it when its
    client leaves. `serve_forever` runs `step` in the calling thread whenever there is work, `start` runs
    it in a background thread; tests may call `step` themselves.
    model: a MiniMindForCausalLM (prepared here, with int8 weights if quantize="int8") or a
    prepared.PreparedModel. observe_step(decoding_rows, prefill_tokens, seconds), when given, hears
    about every step (the server's metrics). few_threads, when given (the server on a CPU): each
    decoding step uses few_threads or every thread torch has when the engine is made, whichever has
    been faster for that many rows, and a prompt every thread (ThreadPolicy).
    """

    def __init__(self, model, tokenizer, max_batch_size=16, max_queue=64, context_length=None,
                 prefill_chunk=DEFAULT_PREFILL_CHUNK, quantize=None, observe_step=None, few_threads=None):
        self.model, self.tokenizer = prepare(model, quantize), tokenizer
        config = self.model.config
        self.device = self.model.device
        self.context_length = min(context_length or config.max_position_embeddings, config.max_position_embeddings)
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.keys_per_token = attention_keys_per_token(config)
        self.eos_ids = set(default_eos_ids(tokenizer, self.model))
        self.pad_token_id = config.pad_token_id or 0
        self.waiting, self.slots = deque(), [None] * max_batch_size
        self.cache = self.model.new_cache(max_batch_size, self.context_length, capacity=256)
        self.condition = threading.Condition()
        self.stats = {"largest_batch": 0, "steps": 0, "finished": 0, "cancelled": 0, "decoding": 0}
        self.observe_step = observe_step
        self.threads = ThreadPolicy(few_threads, torch.get_num_threads()) if few_threads else None
        self.thread, self.alive = None, False  # alive: serve_forever is stepping
        # both set from anywhere, even a signal handler (read between steps):
        self.closing = False  # no new requests; stop when idle
        self.stopping = False  # stop after the step under way; the requests still here fail

    @property
    def running(self):
        """The admitted jobs (prefilling or decoding), in the order of their rows."""
        return [job for job in self.slots if job is not None]

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
            if self.stopping or self.closing:
                raise QueueFull("the server is shutting down")
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
        threads = {} if self.threads is None else {"decoding_steps_by_threads": self.threads.steps}
        return {"running": len(self.running), "waiting": len(self.waiting), "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "context_length": self.context_length, **self.stats, **threads}

    def start(self):
        """Step in a background thread (serve_forever there) until stop()."""
        if self.thread is None:
            self.stopping, self.closing, self.alive = False, False, True
            self.thread = threading.Thread(target=self.serve_forever, name="minimind-engine", daemon=True)
            self.thread.start()

    def stop(self):
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def serve_forever(self, keep_going=None):
        """Step whenever a request waits or runs, in the calling thread, until stop() or `stopping`
        is set (checked after every step), or `closing` is set and nothing is left to do, or (when
        given) keep_going() turns false: these are checked while idle, at least every half second
        when keep_going is given. Then the requests still here fail with "the server is shutting
        down", and later ones are refused. An exception from outside a step (KeyboardInterrupt)
        ends it the same way and goes on up."""
        self.alive = True
        try:
            while self._wait_for_work(keep_going):
                try:
                    self.step()
                except Exception as error:  # a failed step fails its batch, not the server
                    traceback.print_exc(file=sys.stderr)
                    self._fail(self.running, f"generation failed: {type(error).__name__}: {error}")
                    self._drop_done()
        finally:
            self.alive = False
            with self.condition:
                self.stopping = True
                self._fail(self.running + list(self.waiting), "the server is shutting down")
                self._drop_done()
                self.waiting.clear()

    def _wait_for_work(self, keep_going):
        """Block until there is work (True) or the engine is to stop (False)."""
        with self.condition:
            while not (self.stopping or self.waiting or self.running):
                if self.closing or (keep_going is not None and not keep_going()):
                    return False
                self.condition.wait(timeout=None if keep_going is None else 0.5)
            return not self.stopping

    # ------------------------------------------------------------ one step of the batch

    def step(self):
        """Admit waiting requests, prefill within the budget, then decode one token for every
        decoding row. When the step has one prompt pass and rows that decode, both go through the
        model in one pass (its weights read once: PreparedModel.step_and_prefill)."""
        start = time.perf_counter()
        self._admit()
        passes = self._planned_prefill()
        decoding = [job for job in self.slots if job is not None and job.decoding]
        prefilled = None
        if len(passes) == 1 and decoding and hasattr(self.model, "step_and_prefill"):
            prefilled = self._decode_and_prefill(*passes[0])
        if prefilled is None:
            prefilled = sum(self._prefill_pass(*planned) for planned in passes)
            self._drop_done()
            decoding = [job for job in self.slots if job is not None and job.decoding]
            if decoding:
                self._decode_step()
        self._drop_done()
        self.stats["steps"] += 1
        self.stats["decoding"] = len(decoding)
        if self.observe_step is not None:
            self.observe_step(len(decoding), prefilled, time.perf_counter() - start)

    def _admit(self):
        with self.condition:
            while self.waiting and None in self.slots:
                job = self.waiting.popleft()
                job.slot = self.slots.index(None)  # the lowest free row: the decoded rows stay few
                self.slots[job.slot] = job
                self.cache.lengths[job.slot] = 0
                if job.params.repetition_penalty != 1.0:
                    job.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                    job.seen[0, job.prompt_ids] = True
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.running))

    def _planned_prefill(self):
        """This step's prompt work, shortest remaining prompt first: the whole prompts that fit go in
        one pass, then one chunk of the next prompt with what is left of the budget. Returns the
        passes, each (jobs, their pieces of prompt, the column they start at)."""
        pending = sorted((job for job in self.running if not job.done and job.prefilled < len(job.prompt_ids)),
                         key=lambda job: len(job.prompt_ids) - job.prefilled)
        budget, whole, passes = self.prefill_chunk, [], []
        for job in pending:
            remaining = len(job.prompt_ids) - job.prefilled
            if job.prefilled == 0 and remaining <= chunk_tokens(0, budget, self.keys_per_token):
                whole.append(job)
                budget -= remaining * (1 + remaining / (2 * self.keys_per_token))
            else:  # one chunk, of at least a few tokens so that a starved budget still moves on
                size = chunk_tokens(job.prefilled, max(budget, self.prefill_chunk / 8), self.keys_per_token)
                passes.append(([job], [job.prompt_ids[job.prefilled:job.prefilled + min(remaining, size)]],
                               job.prefilled))
                break
            if budget <= 0:
                break
        if whole:
            passes.insert(0, (whole, [job.prompt_ids for job in whole], 0))
        return passes

    def _prefill_pass(self, jobs, pieces, start):
        """One prompt pass alone; a failure fails these requests only. Returns the prompt tokens fed."""
        ids, lengths = self._prompt_input(pieces)
        try:
            logits = self.model.prefill(self.cache, [job.slot for job in jobs], ids, start=start, lengths=lengths)
        except Exception as error:  # these requests fail; the running batch, untouched, goes on
            traceback.print_exc(file=sys.stderr)
            self._fail(jobs, f"generation failed: {type(error).__name__}: {error}")
            return 0
        self._prefilled(jobs, pieces, logits)
        return sum(lengths)

    def _prompt_input(self, pieces):
        """A prompt pass's pieces as one right-padded batch on the model's device, and their lengths;
        every thread is set for reading them."""
        if self.threads is not None:
            self.threads.use_all()
        ids = right_pad([torch.tensor(piece) for piece in pieces], self.pad_token_id).to(self.device)
        return ids, [len(piece) for piece in pieces]

    def _prefilled(self, jobs, pieces, logits):
        """After a prompt pass: the requests whose prompt is now whole pick their first token."""
        for job, piece in zip(jobs, pieces):
            job.prefilled += len(piece)
        ready = [row for row, job in enumerate(jobs) if job.prefilled == len(job.prompt_ids)]
        if ready:
            ready_jobs = [jobs[row] for row in ready]
            for job, token in zip(ready_jobs, self._pick(ready_jobs, logits[ready])):
                self._accept(job, token)

    def _decode_step(self):
        active, tokens = self._decoding_rows()
        if self.threads is None:
            logits = self.model.step(self.cache, tokens, active)
        else:
            logits = self.threads.timed(sum(active), lambda: self.model.step(self.cache, tokens, active))
        self._decoded(active, logits)

    def _decode_and_prefill(self, jobs, pieces, start):
        """The decoding rows' step and one prompt pass through the model at once, on every thread.
        Returns the prompt tokens fed, or None when that fails, having changed nothing the engine
        counts: the two then run apart (step), so that a failing prompt fails its own request only."""
        active, tokens = self._decoding_rows()
        ids, lengths = self._prompt_input(pieces)
        try:
            step_logits, prefill_logits = self.model.step_and_prefill(
                self.cache, tokens, active, [job.slot for job in jobs], ids, start=start, lengths=lengths)
        except Exception:
            return None
        self._decoded(active, step_logits)
        self._prefilled(jobs, pieces, prefill_logits)
        return sum(lengths)

    def _decoding_rows(self):
        """The rows a decoding step feeds (0 up to the last decoding one): which of them decode, and
        their newest tokens (a pad for the others)."""
        rows = 1 + max(slot for slot, job in enumerate(self.slots) if job is not None and job.decoding)
        active = [job is not None and job.decoding for job in self.slots[:rows]]
        tokens = torch.tensor([job.token_ids[-1] if on else self.pad_token_id
                               for job, on in zip(self.slots[:rows], active)], device=self.device)
        return active, tokens

    def _decoded(self, active, logits):
        jobs = [job for job, on in zip(self.slots, active) if on]
        picked = self._pick(jobs, logits[[row for row, on in enumerate(active) if on]])
        for job, token in zip(jobs, picked):
            self._accept(job, token)

    def _pick(self, jobs, logits):
        """Next token of each row: one argmax for the greedy rows (none when no row is greedy); the
        other rows in groups of equal settings, one pick_next_token call each, every row drawing its
        uniform from its own generator (a seeded request then samples what decoding.decode samples
        for it alone)."""
        if any(job.greedy for job in jobs):
            tokens = greedy_tokens(logits)
        else:
            tokens = torch.zeros(len(jobs), dtype=torch.long, device=logits.device)
        groups = {}
        for row, job in enumerate(jobs):
            if not job.greedy:
                p = job.params
                groups.setdefault((p.temperature, p.top_k, p.top_p, p.repetition_penalty), []).append(row)
        for (temperature, top_k, top_p, penalty), rows in groups.items():
            index = torch.tensor(rows, device=self.device)
            uniforms = None
            if temperature > 0:
                uniforms = torch.cat([torch.rand(1, generator=jobs[row].generator, device=self.device) for row in rows])
            seen = torch.cat([jobs[row].seen for row in rows]) if penalty != 1.0 else None
            tokens[index] = pick_next_token(logits[index], seen, temperature, top_k, top_p, penalty, uniforms=uniforms)
        return tokens.tolist()

    def _accept(self, job, token):
        """Give a row's new token to its job: text out, and whether it is finished."""
        if job.done:
            return
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
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
        job.finish_reason, job.finished_at = reason, time.monotonic()
        self.stats["finished"] += 1
        job.tell(Update(piece, len(job.token_ids), finish_reason=reason))

    def _drop_done(self):
        """Finished and cancelled jobs give their rows back."""
        for slot, job in enumerate(self.slots):
            if job is not None and job.done:
                self.slots[slot] = None
                self.cache.lengths[slot] = 0

    def _fail(self, jobs, message):
        for job in jobs:
            if not job.done:
                job.finish_reason, job.finished_at = "error", time.monotonic()
                job.tell(Update("", len(job.token_ids), error=message))
