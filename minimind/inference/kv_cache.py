"""The decoder's key/value cache: a fixed number of rows (slots), one sequence each, that requests
take and give back without moving anyone else's keys.

Per layer one buffer, (slots, 2G, capacity, D): the G key heads, then the G value heads (a token's
keys and values are written in one copy, as the fused q/k/v product gives them side by side).
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
        shape = (slots, 2 * num_key_value_heads, min(capacity, limit), head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * slots  # tokens stored in each row

    @property
    def slots(self):
        return self.buffers[0].shape[0]

    @property
    def capacity(self):
        return self.buffers[0].shape[2]

    def bytes_at_most(self):
        slots, heads, _, head_dim = self.buffers[0].shape
        return len(self.buffers) * slots * heads * self.limit * head_dim * self.buffers[0].element_size()

    def reserve(self, columns):
        """Make room for `columns` columns in every row (at most `limit`)."""
        if columns > self.limit:
            raise ValueError(f"{columns} tokens do not fit a sequence of at most {self.limit}")
        if columns <= self.capacity:
            return
        capacity = min(self.limit, max(columns, 2 * self.capacity))
        for layer, old in enumerate(self.buffers):
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
            new[:, :, :old.shape[2]] = old
            self.buffers[layer] = new

    def split(self, stored):
        """(n, 2G, K, D) -> keys (n, G, K, D), values (n, G, K, D), both views."""
        return stored[:, :self.kv_heads], stored[:, self.kv_heads:]

    def store_chunk(self, layer, rows, start, keys_values):
        """keys_values (n, 2G, S, D) of `rows` (n slot numbers) at columns start..start+S; returns
        those rows' keys and values from column 0 to start+S, (n, 2G, start+S, D)."""
        end = start + keys_values.shape[2]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            rows = slice(rows[0], rows[0] + len(rows))
        else:
            rows = torch.tensor(rows, device=keys_values.device)
        self.buffers[layer][rows, :, start:end] = keys_values
        return self.buffers[layer][rows, :, :end]

    def store_tokens(self, layer, columns, keys_values, width, same_column=None):
        """One new token per row of rows 0..B-1: keys_values (B, 2G, D) at each row's column
        (columns: (B,) long tensor); returns the rows' columns 0..width-1, (B, 2G, width, D).
        same_column: the column when every row writes the same one (a slice, no index tensor)."""
        batch, buffer = keys_values.shape[0], self.buffers[layer]
        if same_column is not None:
            buffer[:batch, :, same_column] = keys_values
        else:
            buffer[torch.arange(batch, device=columns.device), :, columns] = keys_values
        return buffer[:batch, :, :width]

    def copy_rows(self, sources, targets):
        """Row targets[i] becomes a copy of row sources[i] (keys, values and length): the answers of a
        GRPO group share their prompt, which is prefilled once."""
        source = torch.tensor(sources, device=self.device)
        target = torch.tensor(targets, device=self.device)
        for buffer in self.buffers:
            buffer[target] = buffer[source]
        for row, copied in zip(targets, sources):
            self.lengths[row] = self.lengths[copied]
