"""How the decoder holds its weight matrices: y = x @ W^T, computed the fastest way torch offers here.

Decoding one token reads every weight once for a handful of multiply-adds per weight, so its speed
is how fast the weights stream from memory. Two things set that here (docs/benchmarks.md has the
measurements):

- the layout: oneDNN's own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the packing
  torch.compile's freezing pass uses for CPU linears) reads a float matrix faster than F.linear on
  the plain (out, in) matrix, and more so for several rows. One row (a decoding step of one stream)
  may read faster from a second copy kept beside the packed one, and which copy depends on the CPU
  (bench/matrix_layouts.py; docs/benchmarks.md): the (out, in) matrix as blocks of its rows that
  torch.bmm multiplies with x^T as a batch, one block per thread ("row_blocks": 1.5-1.7x the packed
  layout on an AVX-512 AMD Zen 4, but 0.5x on an AVX-512 Intel Xeon), or the (in, out) matrix
  through torch.mm ("columns": 1.6x on an AVX2 Zen 2, 1.16x on the Xeon). So the decoder measures
  it: `settle_few_rows` times one step's products from each copy once per process and shape, and
  keeps the fastest (or none) for one row, and for up to 2, 4 or 8 where it is faster there too;
- the width: int8 weights with one scale per output row (W ~= q * scale, q in [-127, 127]) are a
  quarter of float32's bytes. On the CPU the activations are quantized too, each row on its own
  (x ~= xq * step, step = max |x| / 127, what llama.cpp's q8_0 does per block of 32), and the
  product is int8 x int8 summed in int32, exact: torch's `_int_mm` for one row (a matrix-vector
  product that streams the int8 matrix 2-3x faster than the weight-only product below), oneDNN's
  int8 matmul on a prepacked copy of the matrix (`torch.ops.onednn.qlinear_pointwise`, what
  torch.compile's x86 int8 path calls) for several. Elsewhere (CUDA, or a torch without them) the
  weight-only product `_weight_int8pack_mm` multiplies the int8 matrix with bfloat16 activations.
  Each row's scale is its own, so a row gets the same numbers whatever else is in the batch.
  One exception, for speed: a single row (a decoding step of one stream) goes through fbgemm's
  dynamic int8 linear (`torch.ops.quantized.linear_dynamic`), which quantizes the row and
  multiplies in one call, 1.4x faster than `_int_mm` with our quantization around it. It picks
  its own activation scale and zero point (asymmetric, where ours is symmetric), so a row alone
  and the same row in a batch differ in the last bits; both are within a quantization step of
  the float product. It takes the weights as a qint8 tensor, a kind torch has deprecated
  (pytorch issue 184982): where it is gone, or fails its check, `_int_mm` serves one row again.
  All of this needs a CPU that multiplies int8 in hardware (VNNI, with AVX-512): on an x86 CPU
  without AVX-512 the int8 x int8 products are several times slower than float32, and the
  weight-only product, the fastest product of all there, serves every row (avx512_or_not_x86).

`LinearWeights` is one prepared matrix (often several stacked: q, k and v as one); `Int8Linear` is
the nn.Linear replacement that gives the model's own forward (perplexity in `eval`) int8 weights,
with the same products. The plain formulas they are tested against (tests/test_generation.py):
F.linear(x, W), and for int8 F.linear(xq * step, q * scale[:, None]).
"""
import functools
import platform
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_CHOICES = ("int8",)
INT8_ACTIVATIONS = torch.bfloat16  # what the weight-only _weight_int8pack_mm multiplies int8 weights with


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


def quantize_rows(x, offset=0, dtype=torch.int8):
    """Dynamic activation quantization, x (M, K) float32 -> (xq (M, K), step (M, 1)) with x ~= (xq - offset)
    * step: step = max |x| of the row / 127, xq = round(x / step) + offset (offset 128 with dtype uint8:
    oneDNN's int8 matmul takes unsigned activations). An all-zero row gets a tiny step and zeros."""
    step = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30).div_(127.0)
    xq = torch.div(x, step).round_()
    return (xq.add_(offset) if offset else xq).to(dtype), step


def packable(weight):
    """Whether oneDNN can pack this float matrix: on the CPU, float32 or bfloat16, oneDNN built in."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


_WORKS = {}


def works(name, device):
    """Whether product `name` runs here and gives exact results: "int_mm" (int8 x int8 -> int32, one row),
    "qlinear" (oneDNN's int8 matmul on a prepacked matrix), "weight_only" (int8 weights, bfloat16
    activations). Checked once per device type, on values at the ends of the int8 range (an int16
    accumulator, as in some CPUs' int8 instructions, would saturate there)."""
    device = torch.device(device)
    key = (name, device.type)
    if key not in _WORKS:
        try:
            _WORKS[key] = _PROBES[name](device)
        except (RuntimeError, NotImplementedError, AttributeError):
            _WORKS[key] = False
    return _WORKS[key]


def avx512_or_not_x86(device):
    """False on an x86 CPU without AVX-512 (torch's capability AVX2 or below), True elsewhere. There
    int8 x int8 products have no VNNI instructions to run on (one token's products of the 26M model,
    AMD EPYC Zen 2, 1 thread, CPU time; docs/benchmarks.md: `_int_mm` 21 ms against 2.4 ms for the
    weight-only product), so Int8Product uses the weight-only one."""
    device = torch.device(device)
    if device.type != "cpu" or not is_x86():
        return True
    return torch.backends.cpu.get_cpu_capability() not in ("NO AVX", "DEFAULT", "AVX2")


def row_blocks_product(weight, x):
    """weight (out, in) times x (rows, in), as x @ weight^T, for a few rows: the matrix seen as
    blocks of its rows, one per thread and at least two (halves on two threads), multiplied with x^T
    by torch.bmm as a batch. Each block is then a matrix-vector product over contiguous rows on a
    thread of its own; on an AVX-512 Zen 4 the same product as one F.linear or torch.mv (a batch of
    one) runs 2.7x slower (docs/benchmarks.md, "One row from the matrix's halves"; 2 to 16 blocks
    there took the same time on 1 and 2 threads). Blocks divide `out` exactly (one block where no
    other count does)."""
    out = weight.shape[0]
    blocks = max(2, torch.get_num_threads())
    while out % blocks:
        blocks -= 1
    y = torch.bmm(weight.view(blocks, out // blocks, -1), x.t().unsqueeze(0).expand(blocks, -1, -1))
    return y.view(out, -1).t().contiguous()  # (blocks, out / blocks, rows) -> (rows, out)


# The second copies a packed float matrix may keep for a few rows: how each is made from the (out, in)
# matrix, and its product with x (rows, in); and the row counts measured.
FEW_ROWS_COPIES = {"row_blocks": lambda weight: weight, "columns": lambda weight: weight.t().contiguous()}
FEW_ROWS_PRODUCTS = {"row_blocks": row_blocks_product, "columns": lambda copy, x: torch.mm(x, copy)}
FEW_ROWS = (1, 2, 4, 8)
PACKED_MARGIN = 0.95  # a second copy is kept only where it takes at most this share of the packed layout's time
_FEW_ROWS = {}  # (threads, shapes) -> FewRows: measured once per process


class FewRows:
    """What `settle_few_rows` measured: `times` {(layout, rows): seconds of one step's products, the
    best pass}, "packed" among the layouts (one row from each; more rows from the copy chosen and
    the packed layout); `layout`, the copy one row reads fastest (None: the packed layout itself,
    or a copy less than 5% faster); `limit`, the most rows it serves: the largest count of FEW_ROWS
    up to which it beat the packed layout at every count measured (0 without a copy)."""

    def __init__(self, times):
        self.times = times
        one = {layout: seconds for (layout, rows), seconds in times.items() if rows == 1}
        best = min(one, key=one.get)
        self.layout = best if best != "packed" and one[best] <= PACKED_MARGIN * one["packed"] else None
        self.limit = 0
        for rows in FEW_ROWS if self.layout is not None else ():
            copy, packed = times.get((self.layout, rows)), times.get(("packed", rows))
            if rows > 1 and (copy is None or packed is None or copy >= packed):
                break  # slower here, or not measured (yet)
            self.limit = rows

    def __str__(self):
        measured = ", ".join(f"{layout} {seconds * 1e3:.2f} ms" for (layout, rows), seconds in self.times.items()
                             if rows == 1)
        rows = "one row" if self.limit == 1 else f"1-{self.limit} rows"
        chosen = f"{self.layout} for {rows}" if self.layout else "the packed layout"
        return f"one row reads {chosen} (one step's products, one row: {measured})"


def settle_few_rows(linears, passes=3):
    """Give the packed float matrices among `linears` (one decoding step's, in the order a step reads
    them) the second copy that one row reads fastest on this machine, or none (see the module
    docstring); returns the FewRows measured, None when no matrix is packed. Measured once per
    process for a thread count and the matrices' shapes (measure_few_rows); where that is known
    already, the copy is made when a pass of that few rows first comes."""
    packed = [linear for linear in linears if linear.source is not None]
    if not packed:
        return None
    key = (torch.get_num_threads(), tuple(tuple(linear.source.shape) for linear in packed))
    copies = {}
    if key not in _FEW_ROWS:
        _FEW_ROWS[key], copies = measure_few_rows(packed, passes)
    chosen = _FEW_ROWS[key]
    for linear, copy in zip(packed, copies.get(chosen.layout, [None] * len(packed))):
        linear.keep_few_rows(chosen.layout, chosen.limit, copy)
    return chosen


def measure_few_rows(packed, passes):
    """(FewRows, {layout: the copies made}) for the matrices `packed`: one row from the packed layout
    and from every copy, then 2, 4 and 8 rows from the fastest copy and the packed layout until the
    copy is no faster; the layouts taking turns, the best of `passes` after one to warm up (about
    half a second for the 26M model)."""
    copies = {name: [make(linear.source) for linear in packed] for name, make in FEW_ROWS_COPIES.items()}
    products = {"packed": [linear.packed_product for linear in packed]}
    products.update({name: [functools.partial(FEW_ROWS_PRODUCTS[name], copy) for copy in made]
                     for name, made in copies.items()})
    times = time_products(products, packed, passes, 1)
    layout = FewRows(times).layout
    for rows in FEW_ROWS[1:] if layout is not None else ():
        times.update(time_products({name: products[name] for name in ("packed", layout)}, packed, passes, rows))
        if FewRows(times).limit < rows:  # the copy lost here
            break
    return FewRows(times), copies


def time_products(products, packed, passes, rows):
    """{(layout, rows): the best of `passes` seconds} of one step's products {layout: [product(x)]}
    for `rows` rows of input, the layouts taking turns after one turn to warm up."""
    inputs = [torch.randn(rows, linear.in_features) for linear in packed]
    times = {}
    with torch.no_grad():
        for turn in range(passes + 1):
            for name, functions in products.items():
                start = time.perf_counter()
                for function, x in zip(functions, inputs):
                    function(x)
                seconds = time.perf_counter() - start
                if turn:
                    times[(name, rows)] = min(seconds, times.get((name, rows), seconds))
    return times


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _probe_operands(device, rows):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (rows, 64), generator=generator, dtype=torch.int8)
    q = torch.randint(-127, 128, (24, 64), generator=generator, dtype=torch.int8)
    x[0], q[0] = 127, 127  # 64 x 127 x 127 in one sum, and the most positive pairs
    x[-1], q[1] = -127, 127
    exact = (x.long() @ q.long().t()).double()
    return x.to(device), q.to(device), exact


def _probe_int_mm(device):
    if device.type != "cpu":  # CUDA's _int_mm wants more than 16 rows and aligned shapes: not for decoding
        return False
    x, q, exact = _probe_operands(device, 3)
    return all(torch.equal(torch._int_mm(x[:rows], q.t()).double(), exact[:rows]) for rows in (1, 3))


def _probe_qlinear(device):
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    x, q, exact = _probe_operands(device, 4)
    ones, zeros = torch.ones(q.shape[0]), torch.zeros(q.shape[0], dtype=torch.long)
    y = torch.ops.onednn.qlinear_pointwise((x.int() + 128).to(torch.uint8), 1.0, 128, qlinear_prepack(q), ones, zeros,
                                           None, 1.0, 0, torch.float32, "none", [], "")
    return torch.equal(y.double(), exact)


def _probe_weight_only(device):
    x = torch.ones(1, 32, dtype=INT8_ACTIVATIONS, device=device)
    q = torch.ones(8, 32, dtype=torch.int8, device=device)
    torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=INT8_ACTIVATIONS, device=device))
    return True


def _probe_dynamic(device):
    """fbgemm's dynamic linear, against the float product on values that overflow a 16-bit sum of
    two u8 x s8 products (as CPUs without VNNI compute it unless told to use 7-bit activations)."""
    if device.type != "cpu":
        return False
    q = torch.full((4, 64), 127, dtype=torch.int8)
    q[1], q[2, ::2] = -127, -127
    scale = torch.full((4,), 0.01)
    x = torch.full((1, 64), 3.0)
    y = torch.ops.quantized.linear_dynamic(x, dynamic_prepack(q, scale), False)
    return torch.allclose(y, x @ (q.float() * scale[:, None]).t(), rtol=1e-2, atol=1e-2)


_PROBES = {"int_mm": _probe_int_mm, "qlinear": _probe_qlinear, "weight_only": _probe_weight_only,
           "dynamic": _probe_dynamic}


def linear_dynamic():
    """torch.ops.quantized.linear_dynamic as the C++ operator itself: the op's Python wrapper looks through
    the arguments for traced objects at every call (its packed weights are a TorchBind object), ~2 us of
    a ~15 us product of one row (33 a token)."""
    return getattr(torch.ops.quantized.linear_dynamic.default, "_op", torch.ops.quantized.linear_dynamic)


def dynamic_prepack(q, scale):
    """fbgemm's packed copy of int8 q with its row scales, for torch.ops.quantized.linear_dynamic."""
    with warnings.catch_warnings():
        # the deprecation of qint8 tensors (see the module docstring): said once there, not at every load
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        weight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(weight, None)


def qlinear_prepack(q):
    return torch.ops.onednn.qlinear_prepack(q, None)


class Int8Product:
    """x @ (q * scale[:, None])^T for int8 q (out, in) with float32 scales (out,), by the fastest product
    that works on q's device (see the module docstring). `prepacked`: also keep oneDNN's copy of q for
    products of several rows (twice the int8 bytes, for 1.5-2x on a batch) and fbgemm's for one row
    (once more the int8 bytes, made at the first one-row product); the decoder's matrices take them,
    the model's own Int8Linear, used for scoring long texts, does not."""

    def __init__(self, q, scale, prepacked=True):
        self.q, self.scale = q, scale.float()
        self.q_t = q.t()  # _int_mm's (in, out) operand: a view, the rows of q stay contiguous
        pays = avx512_or_not_x86(q.device)  # int8 x int8 products beat the weight-only one
        self.int_mm = pays and works("int_mm", q.device)
        self.packed = None
        if prepacked and pays and works("qlinear", q.device):
            self.packed, self.zero_points = qlinear_prepack(q), torch.zeros(len(scale), dtype=torch.long)
        # fbgemm's copy for one row, made when the first one-row product comes: a model prepared for
        # batches only (GRPO's 64-row rollouts, at every step) never makes it (a third of preparing)
        self.one_row_dynamic = prepacked and pays and works("dynamic", q.device)
        self.dynamic = self.linear_dynamic = None
        if not self.int_mm:
            self.scale_activations = self.scale.to(INT8_ACTIVATIONS)  # converted once, not per call

    def __call__(self, x):
        """x (M, in) -> (M, out), float32 on the CPU; in bfloat16 for the weight-only product."""
        if self.one_row_dynamic and x.shape[0] == 1:
            if self.dynamic is None:
                self.dynamic, self.linear_dynamic = dynamic_prepack(self.q, self.scale), linear_dynamic()
            return self.linear_dynamic(x.float().contiguous(), self.dynamic, False)
        if self.packed is not None and x.shape[0] > 1:
            xq, step = quantize_rows(x.float(), offset=128, dtype=torch.uint8)
            y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, self.packed, self.scale, self.zero_points, None,
                                                   1.0, 0, torch.float32, "none", [], "")
            return y.mul_(step)
        if self.int_mm:
            xq, step = quantize_rows(x.float())
            return torch._int_mm(xq, self.q_t).mul(self.scale).mul_(step)
        x = x.to(INT8_ACTIVATIONS)
        if works("weight_only", self.q.device):
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale_activations)
        return F.linear(x, dequantize_int8(self.q, self.scale, INT8_ACTIVATIONS))


class LinearWeights:
    """One weight matrix prepared for x @ W^T, from a float matrix or an int8 one with its row scales.

    `format`: "packed" (oneDNN's layout, and for a few rows the second copy that settle_few_rows
    chooses), "int8" (Int8Product) or "plain" (F.linear: GPUs, where cuBLAS needs no help, and
    builds without oneDNN). Inputs of any leading shape (..., in); the output is in the input's
    dtype (float32 from int8 on the CPU; bfloat16 from the weight-only product, which the caller
    casts where it matters: the residual stream's additions promote it back to float32 by
    themselves).
    """

    def __init__(self, weight=None, int8=None):
        self.few_rows, self.few_rows_copy = 0, None  # up to this many rows read a second copy (settle_few_rows)
        self.few_rows_layout = self.few_rows_product = None
        self.source = None  # a packed matrix's (out, in) float matrix, until settle_few_rows decides on a copy
        if int8 is not None:
            self.format, self.product = "int8", Int8Product(*int8)
            self.q, self.scale = self.product.q, self.product.scale
            self.out_features, self.in_features = self.q.shape
            return
        weight = weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        if packable(weight):
            self.format, self.weight = "packed", torch.ops.mkldnn._reorder_linear_weight(weight)
            self.source = weight if weight.dtype == torch.float32 else None
        else:
            self.format, self.weight = "plain", weight

    def keep_few_rows(self, layout, limit, copy=None):
        """Read up to `limit` rows from a second copy in `layout` (a FEW_ROWS_COPIES name; None: none,
        and the (out, in) source is freed) (settle_few_rows calls this): `copy` where it is made
        already, else made when a pass of that few rows first comes, so that a model prepared for
        large batches only (GRPO's rollouts, at every step) never makes it."""
        if layout is None:
            self.source = None
            return
        self.few_rows, self.few_rows_layout = limit, layout
        self.few_rows_product = FEW_ROWS_PRODUCTS[layout]
        if copy is not None:
            self.few_rows_copy, self.source = copy, None

    def make_few_rows_copy(self):
        self.few_rows_copy, self.source = FEW_ROWS_COPIES[self.few_rows_layout](self.source), None

    def packed_product(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, None, "none", [], "")

    def __call__(self, x):
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        if x.shape[0] <= self.few_rows:
            if self.few_rows_copy is None:
                self.make_few_rows_copy()
            return self.few_rows_product(self.few_rows_copy, x)
        if self.format == "packed":
            return self.packed_product(x)
        if self.format == "int8":
            return self.product(x)
        return F.linear(x, self.weight)

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
        # Made per call, not kept: q may have moved (model.to(device)) since; it is a few views.
        y = Int8Product(self.q, self.scale, prepacked=False)(x.reshape(-1, x.shape[-1])).to(x.dtype)
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
