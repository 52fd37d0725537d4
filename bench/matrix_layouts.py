"""One token's matrix products in each float32 layout the decoder could read, for 1 to 8 rows.

    python bench/matrix_layouts.py                  # 2 threads (torch's default here), ~1 minute
    python bench/matrix_layouts.py --threads 1 --rows 1,2,3,8

The products of one decoding step of the default 26M shape as the decoder runs them (per layer
q/k/v fused, o, gate/up fused, down; then the output layer: 33 products), with random weights and
--rows rows of input. Before each timed pass the script writes over 64 MB, so the weights come
from memory as in a real step (they do not fit the caches), and the best of --repeats passes
counts. Layouts (weights.LinearWeights):
    packed    oneDNN's blocked layout (torch.ops.mkldnn._linear_pointwise): the baseline of the ratios
    halves    the (out, in) matrix as blocks of its rows, one per thread and at least two (halves on two
              threads), torch.bmm(blocks, x^T as a batch) (weights.row_blocks_product)
    columns   the (in, out) matrix through torch.mm
    F.linear  the plain (out, in) matrix (what the model's own forward does)
The decoder keeps the packed layout and, for a few rows, the second copy (halves or columns) that
it measured fastest as the model was prepared (weights.settle_few_rows): the fastest differs
between CPUs (docs/benchmarks.md, "The copy one row reads, measured where it runs").
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from minimind.inference.weights import FEW_ROWS_COPIES, FEW_ROWS_PRODUCTS
from minimind.model.config import MiniMindConfig


def step_matrices(config):
    """(out, in) float32 matrices of one decoding step, random."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim, inner = config.head_dim, config.intermediate_size
    layer = [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * inner, hidden),
             (hidden, inner)]
    shapes = layer * config.num_hidden_layers + [(config.vocab_size, hidden)]
    return [torch.randn(rows, columns) * 0.02 for rows, columns in shapes]


def layouts(matrices):
    """{name: product(matrix index, x)} for every layout, the copies made now; halves and columns are
    the decoder's own second copies and products (weights.FEW_ROWS_COPIES, FEW_ROWS_PRODUCTS)."""
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in matrices]

    def copy_of(name):
        copies = [FEW_ROWS_COPIES[name](w) for w in matrices]
        return lambda i, x: FEW_ROWS_PRODUCTS[name](copies[i], x)
    return {
        "packed": lambda i, x: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
        "halves": copy_of("row_blocks"),
        "columns": copy_of("columns"),
        "F.linear": lambda i, x: F.linear(x, matrices[i]),
    }


def best_ms(product, matrices, inputs, repeats, flush):
    best = float("inf")
    for _ in range(repeats):
        flush.mul_(1.0)  # evict the weights from the caches
        start = time.perf_counter()
        for index, matrix in enumerate(matrices):
            product(index, inputs[matrix.shape[1]])
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--rows", default="1,2,3,4,8")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    matrices = step_matrices(MiniMindConfig())
    products = layouts(matrices)
    flush = torch.zeros(64 * 2**20 // 4)
    megabytes = sum(m.numel() for m in matrices) * 4 / 1e6
    print(f"default 26M shape: {len(matrices)} products, {megabytes:.1f} MB of float32 weights; "
          f"{torch.get_num_threads()} threads; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"best of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
    print("| rows | " + " | ".join(products) + " |")
    print("| ---: |" + " ---: |" * len(products))
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            inputs = {size: torch.randn(rows, size) for size in {m.shape[1] for m in matrices}}
            times = {name: best_ms(product, matrices, inputs, args.repeats, flush) for name, product in products.items()}
            cells = [f"{ms:.2f} ms" + ("" if name == "packed" else f" ({times['packed'] / ms:.2f}x)")
                     for name, ms in times.items()]
            print(f"| {rows} | " + " | ".join(cells) + " |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
