"""The decoder's key/value cache: a fixed number of rows (slots), one sequence each, that requests
take and give back without moving anyone else's keys.

Per layer one buffer, (2, slots, G, capacity, D): keys, then values, G heads each. A token's keys
and values are written in one copy (the fused q/k/v product gives them side by side), and a batch's
keys (rows, G, width, D) are one strided view whose rows and heads merge into one batch dimension:
attention multiplies them where they lie, with no copy (a copy of every cached key per step and
layer cost a batch of 8 rows 10% of its step).
Rows are left-aligned: token t of a row is in column t, so a row's positions are its column
numbers and a new token goes to column `lengths[row]`. Rows of different lengths decode together:
the attention mask hides each row's columns past its length (prepared.PreparedModel builds it),
and nothing is padded on the left, so a row's keys never move while it lives, whoever joins or
leaves the batch.

Capacity grows by doubling up to `limit`, the longest sequence allowed; memory is at most slots x
limit x (keys + values) of every layer, which `bytes_at_most` reports. A grown buffer is left as the
allocator gives it (a fresh mapping: no page is touched until written), and only what each row holds
is copied into it: zeroing and copying the whole of a server's 16 rows while one 20,000-token prompt
was read paused every request in the batch for up to 1.2-1.5 s (2.6 GB zeroed when the prompt passed
16,384 columns) and left 3 GB resident (bench/cache_growth.py). So attention
must not read a column that was never written: a masked column still meets its key and value in the
products, and untouched memory may hold NaN. `finite[row]` counts the columns from 0 that hold
numbers (written, or zeros), and `readable` zeroes a row's columns up to what a step will read.
"""
import torch

ZERO_AHEAD = 256


class SlotCache:
    # What a grown buffer holds before it is written (None: whatever the allocator gives). The tests set
    # NaN, so that a column read before it is written or zeroed changes the logits.
    untouched_fill = None

    def __init__(self, num_layers, slots, num_key_value_heads, head_dim, dtype, device, limit, capacity=256):
        self.limit, self.dtype, self.device = limit, dtype, device
        self.kv_heads = num_key_value_heads
        shape = (2, slots, num_key_value_heads, min(capacity, limit), head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * slots  # tokens stored in each row
        self.finite = [self.capacity] * slots  # columns from 0 of each row that hold numbers
        self._starts, self._starts_capacity = None, None  # token_places' table, for one capacity

    @property
    def slots(self):
        return self.buffers[0].shape[1]

    @property
    def capacity(self):
        return self.buffers[0].shape[3]

    def bytes_at_most(self):
        _, slots, heads, _, head_dim = self.buffers[0].shape
        return len(self.buffers) * 2 * slots * heads * self.limit * head_dim * self.buffers[0].element_size()

    def reserve(self, columns):
        """Make room for `columns` columns in every row (at most `limit`)."""
        if columns > self.limit:
            raise ValueError(f"{columns} tokens do not fit a sequence of at most {self.limit}")
        if columns <= self.capacity:
            return
        capacity = min(self.limit, max(columns, 2 * self.capacity))
        for layer, old in enumerate(self.buffers):
            new = old.new_empty(*old.shape[:3], capacity, old.shape[4])
            if self.untouched_fill is not None:
                new.fill_(self.untouched_fill)
            for row, finite in enumerate(self.finite):
                new[:, row, :, :finite] = old[:, row, :, :finite]
            self.buffers[layer] = new

    def readable(self, rows, width):
        """Rows 0..rows-1 are about to be read in columns 0..width-1: zero what none has written, and
        ZERO_AHEAD columns more (a decoding batch reads one column more every step)."""
        for row in range(rows):
            if self.finite[row] < width:
                end = min(self.capacity, width + ZERO_AHEAD)
                for buffer in self.buffers:
                    buffer[:, row, :, self.finite[row]:end] = 0
                self.finite[row] = end

    def written(self, rows, end):
        """`rows` now hold keys and values up to column end (from their length, which is within
        what holds numbers)."""
        for row in rows:
            self.finite[row] = max(self.finite[row], end)

    def store_chunk(self, layer, rows, start, keys_values):
        """keys_values (n, 2G, S, D) of `rows` (n slot numbers) at columns start..start+S; returns
        those rows' keys and values from column 0 to start+S, each (n, G, start+S, D)."""
        rows_count, _, seq_len, head_dim = keys_values.shape
        end = start + seq_len
        if rows == list(range(rows[0], rows[0] + len(rows))):
            rows = slice(rows[0], rows[0] + len(rows))
        else:
            rows = torch.tensor(rows, device=keys_values.device)
        buffer = self.buffers[layer]
        buffer[:, rows, :, start:end] = keys_values.view(rows_count, 2, self.kv_heads, seq_len, head_dim).transpose(0, 1)
        return buffer[0, rows, :, :end], buffer[1, rows, :, :end]

    def token_places(self, batch, columns):
        """Where one new token of each of rows 0..batch-1 goes, row b at column columns[b] (a (batch,)
        long tensor; or an int, every row's column), as store_tokens takes it: (batch x 2G,) rows of a
        layer's buffer seen as (2 x slots x G x capacity, D), in the order of a step's keys and values
        (row, keys then values, head). Made once per step for every layer (the capacity must not
        change before)."""
        if self._starts_capacity != self.capacity:  # each (row, keys or values, head)'s column 0
            slots, heads, capacity = self.slots, self.kv_heads, self.capacity
            kind = torch.arange(2, device=self.device).view(1, 2, 1) * (slots * heads * capacity)
            pair = torch.arange(slots * heads, device=self.device).view(slots, 1, heads) * capacity
            self._starts, self._starts_capacity = kind + pair, capacity
        return (self._starts[:batch] + (columns if isinstance(columns, int) else columns.view(-1, 1, 1))).view(-1)

    def store_tokens(self, layer, places, keys_values, width):
        """One new token per row of rows 0..B-1: keys_values (B, 2G, D) at each row's column (places:
        token_places); returns the rows' keys and values in columns 0..width-1, each (B x G, width, D),
        (row, head) pairs in order. One index_copy_ for all rows and heads (an indexed assignment took
        3-5 times as long)."""
        batch, _, head_dim = keys_values.shape
        buffer = self.buffers[layer]
        buffer.view(-1, head_dim).index_copy_(0, places, keys_values.flatten(0, 1))
        keys, values = buffer.view(2, -1, *buffer.shape[3:])[:, :batch * self.kv_heads, :width]
        return keys, values

    def copy_rows(self, sources, targets):
        """Row targets[i] becomes a copy of row sources[i] (keys, values and length): the answers of a
        GRPO group share their prompt, which is prefilled once."""
        source = torch.tensor(sources, device=self.device)
        target = torch.tensor(targets, device=self.device)
        for buffer in self.buffers:
            buffer[:, target] = buffer[:, source]
        for row, copied in zip(targets, sources):
            self.lengths[row], self.finite[row] = self.lengths[copied], self.finite[copied]
