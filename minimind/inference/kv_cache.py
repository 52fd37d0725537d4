"""The decoder's key/value cache: a fixed number of rows (slots), one sequence each, that requests
take and give back without moving anyone else's keys.

Per layer one buffer of keys and one of values, (slots, G, capacity, D). Rows are left-aligned:
token t of a row is in column t, so a row's positions are its column numbers and a new token goes
to column `lengths[row]`. Rows of different lengths decode together: the attention mask hides
each row's columns past its length (prepared.PreparedModel builds it), and nothing is padded on
the left, so a row's keys never move while it lives, whoever joins or leaves the batch.

Capacity grows by doubling (a copy of what is stored, amortised over the tokens that filled it) up
to `limit`, the longest sequence allowed; memory is at most slots x limit x (keys + values) of
every layer, which `bytes_at_most` reports.
"""
import torch


class SlotCache:
    def __init__(self, num_layers, slots, num_key_value_heads, head_dim, dtype, device, limit, capacity=256):
        self.shape = (slots, num_key_value_heads, min(capacity, limit), head_dim)
        self.limit, self.dtype, self.device = limit, dtype, device
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * slots  # tokens stored in each row

    @property
    def slots(self):
        return self.shape[0]

    @property
    def capacity(self):
        return self.keys[0].shape[2]

    def bytes_at_most(self):
        slots, heads, _, head_dim = self.shape
        return 2 * len(self.keys) * slots * heads * self.limit * head_dim * self.keys[0].element_size()

    def reserve(self, columns):
        """Make room for `columns` columns in every row (at most `limit`)."""
        if columns > self.limit:
            raise ValueError(f"{columns} tokens do not fit a sequence of at most {self.limit}")
        if columns <= self.capacity:
            return
        capacity = min(self.limit, max(columns, 2 * self.capacity))
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :old.shape[2]] = old
                buffers[layer] = new

    def store_chunk(self, layer, rows, start, key, value):
        """key, value (n, G, S, D) of `rows` (n slot numbers) at columns start..start+S; returns those
        rows' keys and values from column 0 to start+S, (n, G, start+S, D)."""
        end = start + key.shape[2]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            rows = slice(rows[0], rows[0] + len(rows))
        else:
            rows = torch.tensor(rows, device=key.device)
        self.keys[layer][rows, :, start:end] = key
        self.values[layer][rows, :, start:end] = value
        return self.keys[layer][rows, :, :end], self.values[layer][rows, :, :end]

    def store_tokens(self, layer, columns, key, value, width, same_column=None):
        """One new token per row of rows 0..B-1: key, value (B, G, 1, D) at each row's column
        (columns: (B,) long tensor); returns keys and values of columns 0..width-1, (B, G, width, D).
        same_column: the column when every row writes the same one (a slice, no index tensor)."""
        batch = key.shape[0]
        if same_column is not None:
            self.keys[layer][:batch, :, same_column] = key[:, :, 0]
            self.values[layer][:batch, :, same_column] = value[:, :, 0]
        else:
            rows = torch.arange(batch, device=columns.device)
            self.keys[layer][rows, :, columns] = key[:, :, 0]
            self.values[layer][rows, :, columns] = value[:, :, 0]
        return self.keys[layer][:batch, :, :width], self.values[layer][:batch, :, :width]

    def copy_rows(self, sources, targets):
        """Row targets[i] becomes a copy of row sources[i] (keys, values and length): the answers of a
        GRPO group share their prompt, which is prefilled once."""
        source = torch.tensor(sources, device=self.device)
        target = torch.tensor(targets, device=self.device)
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target] = buffer[source]
        for row, copied in zip(targets, sources):
            self.lengths[row] = self.lengths[copied]
