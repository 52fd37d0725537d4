"""How the decoder holds its weight matrices: y = x @ W^T, computed the fastest way torch offers here.

Decoding one token reads every weight once for a handful of multiply-adds per weight, so its speed
is how fast the weights stream from memory. Two things set that here (docs/benchmarks.md has the
measurements):

- the layout: oneDNN's own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the packing
  torch.compile's freezing pass uses for CPU linears) reads a matrix 1.4-1.8x faster than
  F.linear on the plain (out, in) matrix at batch 1, and 2.4x at batch 8;
- the width: int8 weights with one scale per output row (W ~= q * scale, q in [-127, 127]) are a
  quarter of float32's bytes; torch's `_weight_int8pack_mm` multiplies them with bfloat16
  activations (the weight-only int8 matmul of gpt-fast and torchao).

`LinearWeights` is one prepared matrix (often several stacked: q, k and v as one); `Int8Linear` is
the nn.Linear replacement that gives the model's own forward (perplexity in `eval`) int8 weights.
The plain formula they are tested against (tests/test_generation.py): F.linear(x, W), and for int8
F.linear(x, q * scale[:, None]).
"""
import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_CHOICES = ("int8",)
INT8_ACTIVATIONS = torch.bfloat16  # what _weight_int8pack_mm multiplies the int8 weights with on the CPU


def quantize_int8(weight):
    """weight (out, in) -> (q int8 (out, in), scale float32 (out,)): symmetric, one scale per output row,
    scale = max |w| / 127, so every row uses the whole int8 range; an all-zero row gets scale 1."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q, scale, dtype=torch.float32):
    return q.to(dtype) * scale.to(dtype)[:, None]


def packable(weight):
    """Whether oneDNN can pack this float matrix: on the CPU, float32 or bfloat16, oneDNN built in."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


_INT8_MATMUL_WORKS = {}


def int8_matmul_works(device):
    """Whether torch's int8 weight-only matmul runs on this device (a CPU does; older CUDA builds lack it)."""
    device = torch.device(device)
    if device.type not in _INT8_MATMUL_WORKS:
        try:
            x = torch.ones(1, 32, dtype=INT8_ACTIVATIONS, device=device)
            q = torch.ones(8, 32, dtype=torch.int8, device=device)
            torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=INT8_ACTIVATIONS, device=device))
            _INT8_MATMUL_WORKS[device.type] = True
        except (RuntimeError, NotImplementedError):
            _INT8_MATMUL_WORKS[device.type] = False
    return _INT8_MATMUL_WORKS[device.type]


def int8_matmul(x, q, scale):
    """x (N, in) @ (q * scale[:, None])^T, in bfloat16: torch's int8 weight-only matmul on bfloat16
    activations where it exists, else the dequantized matrix."""
    x = x.to(INT8_ACTIVATIONS)
    if int8_matmul_works(q.device):
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale.to(INT8_ACTIVATIONS))
    return F.linear(x, dequantize_int8(q, scale, INT8_ACTIVATIONS))


class LinearWeights:
    """One weight matrix prepared for x @ W^T, from a float matrix or an int8 one with its row scales.

    `format`: "packed" (oneDNN's layout), "int8" (int8_matmul) or "plain" (F.linear: GPUs, where
    cuBLAS needs no help, and builds without oneDNN). Inputs of any leading shape (..., in); the
    output is in the input's dtype, or bfloat16 for int8 (the caller casts where it matters: the
    residual stream's additions promote it back to float32 by themselves).
    """

    def __init__(self, weight=None, int8=None):
        if int8 is not None:
            self.format, (self.q, self.scale) = "int8", int8
            self.scale_activations = self.scale.to(INT8_ACTIVATIONS)  # converted once, not per call
            self.out_features, self.in_features = self.q.shape
            return
        weight = weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        if packable(weight):
            self.format, self.weight = "packed", torch.ops.mkldnn._reorder_linear_weight(weight)
        else:
            self.format, self.weight = "plain", weight

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.format == "packed":
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, None, "none", [], "")
        elif self.format == "int8":
            y = int8_matmul(x, self.q, self.scale_activations)
        else:
            y = F.linear(x, self.weight)
        return y.view(*shape[:-1], self.out_features)

    def nbytes(self):
        """Bytes one pass reads: what bounds the speed of decoding at batch 1."""
        if self.format == "int8":
            return self.q.numel() + self.scale.numel() * 4
        return self.out_features * self.in_features * self.weight.element_size()


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one float32 scale per output row (no bias: the model has none).

    `weight` gives the dequantized matrix (q * scale), for code that reads the matrix itself (the
    chunked loss in model/kernels.py reads the output layer's)."""

    def __init__(self, linear):
        super().__init__()
        q, scale = quantize_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    @property
    def weight(self):
        return dequantize_int8(self.q, self.scale)

    def forward(self, x):
        y = int8_matmul(x.reshape(-1, x.shape[-1]), self.q, self.scale).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_linears(model, quantize="int8"):
    """Replace every nn.Linear of `model` (the output layer included, the embedding not) by its int8
    form, in place; returns the model. Its float matrices are freed: the model is for inference now."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if module.bias is not None:
            raise ValueError(f"{name} has a bias; int8 weights are for the bias-free MiniMind linears")
        setattr(parent, child, Int8Linear(module))
    return model


def matrix_of(module, quantize=None):
    """A linear's matrix as the decoder keeps it: float (out, in), or (q, scale) when quantize is
    "int8" (quantized now) or the module is an Int8Linear already."""
    if isinstance(module, Int8Linear):
        return module.q, module.scale
    if quantize == "int8":
        return quantize_int8(module.weight)
    return module.weight.detach()


def rows_of(matrix, index):
    """Rows `index` of a float matrix or of an int8 one with its scales."""
    return (matrix[0][index], matrix[1][index]) if isinstance(matrix, tuple) else matrix[index]


def stacked(matrices):
    """LinearWeights of several matrices of the same input stacked into one (their outputs side by
    side, in order): all float, or all int8 (q, scale) pairs."""
    if isinstance(matrices[0], tuple):
        return LinearWeights(int8=(torch.cat([q for q, _ in matrices]), torch.cat([s for _, s in matrices])))
    return LinearWeights(torch.cat(matrices))
