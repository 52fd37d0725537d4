"""Decoding through llama.cpp: the same two passes as prepared.PreparedModel (`prefill`, `step`),
computed by llama.cpp (llama-cpp-python, the `ecosystem` extra) on a GGUF export of the model.

Why: on a CPU, one token of a small model is a few milliseconds of matrix-vector products, and torch
reads a row of weights from one thread as fast as from two, while llama.cpp's own kernels stream them
from every core (docs/benchmarks.md, "Against llama.cpp"). Everything around the forward pass stays
ours: the decode loop (decoding.decode), sampling (sampling.pick_next_token), stop strings, the
server's scheduler (serving/engine.py), so `generate`, `chat`, `eval` and `serve` work the same with
`--backend llama.cpp`.

How it maps:
- the model is written to a temporary GGUF file (interop/gguf.py, exact in llama.cpp), float32, or q8_0
  for `quantize="int8"`; llama.cpp reads it once;
- a row of the decoder's cache is a llama.cpp sequence (its id is the row number); a row that starts
  a new prompt first drops its old keys. When every row's limit fits POOL_TOKENS, each sequence has
  cells of its own (a stream of its own, llama.cpp's default) and attention is llama.cpp's plain one;
  beyond that (the server's rows at a long context) the rows share one pool of cells (`kv_unified`),
  where llama.cpp's flash attention reads only a row's own cells (choose_layout has the figures);
- a pass is one `llama_decode` of a batch whose entries each carry (token, position, sequence), with
  logits asked for only where the decoder picks a token.
Keys and values are kept in float16, as llama.cpp keeps them by default: float32 keys made a token of
the 4.6M session model 1.5x slower (830 against 1,270 tokens/s on 2 cores). The logits then differ from
the torch decoder's in the third decimal; greedy tokens are the same wherever two tokens are not
nearly tied (tests/test_llama_cpp_backend.py; all 224 held-out answers of the CPU session's model).
"""
import ctypes
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

INSTALL_HINT = ("--backend llama.cpp needs llama-cpp-python: pip install -e '.[ecosystem]' "
                "(it builds llama.cpp from source, ~10-15 minutes on 2 cores)")
BATCH_TOKENS = 512  # entries of one llama_decode call; a longer prefill takes several
# llama.cpp allocates its KV cache whole when a context is made, where kv_cache.SlotCache grows as rows
# fill: rows x limit cells, but at most this many tokens (and at least one row's limit), 256 MiB of
# float32 keys and values for the 26M model; beyond it the rows share the pool.
POOL_TOKENS = 32768
CELL_BLOCK = 256  # llama.cpp rounds a context's cells to this


def choose_layout(slots, limit):
    """(shared, cells, row_cells) for `slots` rows of at most `limit` tokens each; row_cells: the cells
    one row may fill.

    Separate streams (shared False, cells = rows x limit) wherever they fit the pool, with flash
    attention off; else one shared pool (kv_unified) with flash attention on (llama.cpp's default).
    Measured on the 26M shape, 2 threads, 1024-token prompts, 128 new tokens (Xeon, 2026-12-07):
    one row decoded 284 tokens/s in its own stream against 132 in the shared pool with flash attention;
    eight rows 692 against 145 (and 303 in the shared pool without flash attention, whose prefill of the
    eight prompts then took 12.1 s against 3.9 s with it: every row's attention spans the whole pool)."""
    limit = -(-limit // CELL_BLOCK) * CELL_BLOCK
    if slots * limit <= POOL_TOKENS:
        return False, slots * limit, limit
    cells = max(limit, POOL_TOKENS)
    return True, cells, cells


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise UserError(INSTALL_HINT) from error
    return llama_cpp


_quiet_log = None  # the log callback that silences llama.cpp; held here so that it is never collected


def silence(llama_cpp):
    global _quiet_log
    if _quiet_log is None:
        _quiet_log = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()


class SequenceCache:
    """The decoder's cache when llama.cpp holds the keys: `lengths` per row, as kv_cache.SlotCache."""

    def __init__(self, backend, slots, limit):
        self.backend, self.limit = backend, limit
        self.lengths = [0] * slots

    def reserve(self, columns):
        if columns > self.limit:
            raise ValueError(f"{columns} tokens do not fit a sequence of at most {self.limit}")

    def copy_rows(self, sources, targets):
        """Row targets[i] becomes a copy of row sources[i] (a GRPO group's shared prompt)."""
        for source, target in zip(sources, targets):
            self.backend.forget(target)
            self.backend.llama_cpp.llama_memory_seq_cp(self.backend.memory, source, target, -1, -1)
            self.lengths[target] = self.lengths[source]


class LlamaCppModel:
    """A model whose decoding passes llama.cpp computes; used wherever a PreparedModel is.

    model: a float32 (or bfloat16) MiniMindForCausalLM; it stays as it is (eval scores text with
    its own forward). quantize: None (float32 matrices) or "int8" (q8_0). threads: llama.cpp's
    threads [torch's count at each pass, so a caller that sets torch's threads sets these too].
    """

    def __init__(self, model, tokenizer, quantize=None, threads=None):
        from ..interop.gguf import write_gguf

        self.llama_cpp = llama_cpp = import_llama_cpp()
        silence(llama_cpp)
        self.model, self.config, self.quantize, self.threads = model, model.config, quantize, threads
        self.device = torch.device("cpu")
        self.folder = tempfile.TemporaryDirectory(prefix="minimind-gguf-")
        path = Path(self.folder.name) / "model.gguf"
        state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
        write_gguf(model.config, state, tokenizer, path, "q8_0" if quantize == "int8" else "float32")
        self.handle = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.handle:
            raise RuntimeError(f"llama.cpp could not load the GGUF export of the model ({path})")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.handle))
        self.context = self.memory = None
        self.cells = self.rows = self.row_cells = 0
        self.shared = None
        self.batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.thread_count = None

    @property
    def context_length(self):
        return self.config.max_position_embeddings

    def new_cache(self, slots, limit, capacity=None):
        """`slots` rows of at most `limit` tokens each (choose_layout); the llama.cpp context is made
        again only when it holds fewer rows or cells than that, or the other layout."""
        limit = min(limit, self.context_length)
        shared, cells, row_cells = choose_layout(slots, limit)
        if self.context is None or slots > self.rows or shared != self.shared or row_cells > self.row_cells:
            self._open(slots, cells, shared, row_cells)
        self.llama_cpp.llama_memory_clear(self.memory, True)
        return SequenceCache(self, slots, limit)

    def _open(self, rows, cells, shared, row_cells):
        llama_cpp = self.llama_cpp
        self.close_context()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = cells, rows, shared
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if shared
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        self.context = llama_cpp.llama_init_from_model(self.handle, params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not make a context of {cells} cells for {rows} rows")
        self.memory, self.thread_count = llama_cpp.llama_get_memory(self.context), None
        self.rows, self.cells, self.shared, self.row_cells = rows, cells, shared, row_cells

    def forget(self, row):
        self.llama_cpp.llama_memory_seq_rm(self.memory, row, -1, -1)

    def _set_threads(self):
        count = self.threads or torch.get_num_threads()
        if count != self.thread_count:
            self.llama_cpp.llama_set_n_threads(self.context, count, count)
            self.thread_count = count

    def _run(self, entries):
        """llama_decode over entries (token, position, row, wants logits), BATCH_TOKENS at a time;
        returns the logits of the entries that want them, in order, (n, vocab) float32."""
        self._set_threads()
        batch, outputs = self.batch, []
        for begin in range(0, len(entries), BATCH_TOKENS):
            piece = entries[begin:begin + BATCH_TOKENS]
            batch.n_tokens = len(piece)
            for i, (token, position, row, wanted) in enumerate(piece):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, wanted
                batch.seq_id[i][0] = row
            status = self.llama_cpp.llama_decode(self.context, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed (status {status}): the KV cache of {self.cells} "
                                   f"tokens is full (fewer rows at once: --max_batch_size)"
                                   if status == 1 else f"llama_decode failed (status {status})")
            wanted = sum(entry[3] for entry in piece)
            if wanted:
                pointer = self.llama_cpp.llama_get_logits(self.context)
                outputs.append(np.ctypeslib.as_array(pointer, shape=(wanted, self.vocab)).copy())
        if not outputs:
            return torch.empty(0, self.vocab)
        return torch.from_numpy(np.concatenate(outputs))[:, :self.config.vocab_size]

    @torch.inference_mode()
    def prefill(self, cache, rows, input_ids, start=0, lengths=None):
        """As PreparedModel.prefill: a chunk of tokens for `rows`, each holding `start` tokens;
        returns the logits after each row's last real token, (n, vocab)."""
        batch, seq_len = input_ids.shape
        lengths = [seq_len] * batch if lengths is None else list(lengths)
        cache.reserve(start + seq_len)
        entries = []
        for row, ids, length in zip(rows, input_ids.tolist(), lengths):
            self.llama_cpp.llama_memory_seq_rm(self.memory, row, start, -1)  # an earlier request's keys, if any
            entries += [(token, start + i, row, i == length - 1) for i, token in enumerate(ids[:length])]
            cache.lengths[row] = start + length
        return self._run(entries)

    @torch.inference_mode()
    def step(self, cache, tokens, active=None):
        """As PreparedModel.step: one new token for each active row of rows 0..B-1; (B, vocab) logits
        (zeros for the rows that are not decoding)."""
        batch = tokens.shape[0]
        active = [True] * batch if active is None else list(active)
        cache.reserve(max(length for length, on in zip(cache.lengths, active) if on) + 1)
        live = [row for row in range(batch) if active[row]]
        logits = self._run([(token, cache.lengths[row], row, True)
                            for row, token in zip(live, tokens[live].tolist())])
        for row in live:
            cache.lengths[row] += 1
        if len(live) == batch:
            return logits
        out = logits.new_zeros(batch, logits.shape[1])
        out[live] = logits
        return out

    def close_context(self):
        if self.context is not None:
            self.llama_cpp.llama_free(self.context)
            self.context = self.memory = None

    def close(self):
        """Free llama.cpp's model, context and batch, and the temporary GGUF file."""
        if getattr(self, "handle", None) is None:
            return
        self.close_context()
        self.llama_cpp.llama_batch_free(self.batch)
        self.llama_cpp.llama_model_free(self.handle)
        self.handle = None
        self.folder.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the library may be gone first
            pass
