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

Capacity grows by doubling (a copy of what is stored, amortised over the tokens that filled it) up
to `limit`, the longest sequence allowed; memory is at most slots x limit x (keys + values) of
every layer, which `bytes_at_most` reports.
"""
import torch


class SlotCache:
    def __init__(self, num_layers, slots, num_key_value_heads, head_dim, dtype, device, limit, capacity=256):
        self.limit, self.dtype, self.device = limit, dtype, device
        self.kv_heads = num_key_value_heads
        shape = (2, slots, num_key_value_heads, min(capacity, limit), head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * slots  # tokens stored in each row

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
            new = old.new_zeros(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, :old.shape[3]] = old
            self.buffers[layer] = new

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

    def store_tokens(self, layer, columns, keys_values, width, same_column=None):
        """One new token per row of rows 0..B-1: keys_values (B, 2G, D) at each row's column
        (columns: (B,) long tensor); returns the rows' keys and values in columns 0..width-1, each
        (B, G, width, D). same_column: the column when every row writes the same one (a slice, no
        index tensor)."""
        batch, _, head_dim = keys_values.shape
        buffer = self.buffers[layer]
        keys_values = keys_values.view(batch, 2, self.kv_heads, head_dim)
        if same_column is not None:
            buffer[:, :batch, :, same_column] = keys_values.transpose(0, 1)
        else:  # two index tensors apart: the indexed shape is (B, 2, G, D)
            buffer[:, torch.arange(batch, device=columns.device), :, columns] = keys_values
        return buffer[0, :batch, :, :width], buffer[1, :batch, :, :width]

    def copy_rows(self, sources, targets):
        """Row targets[i] becomes a copy of row sources[i] (keys, values and length): the answers of a
        GRPO group share their prompt, which is prefilled once."""
        source = torch.tensor(sources, device=self.device)
        target = torch.tensor(targets, device=self.device)
        for buffer in self.buffers:
            buffer[:, target] = buffer[:, source]
        for row, copied in zip(targets, sources):
            self.lengths[row] = self.lengths[copied]
