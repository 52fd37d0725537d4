"""What turning tokens into text costs a long reply: `decoding.TextStream` (every decoder's text: the
server's rows, `generate`, `chat`) decodes only the tokens since its last whole-character point, where it
decoded the whole reply again at every token; both ways in this process, on the same tokens.

    python bench/text_stream.py                 # replies of 512 and 2,000 random tokens of the bundled tokenizer
"""
import argparse
import time

import torch

from minimind.data.tokenizer import load_tokenizer
from minimind.inference.decoding import TextStream


def seconds(tokenizer, ids, window):
    """Time to push every token of `ids`, and the text it gave."""
    stream = TextStream(tokenizer)
    stream.additive = stream.additive and window
    start = time.perf_counter()
    text = "".join(stream.push(token) for token in ids) + stream.finish()
    return time.perf_counter() - start, text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2000])
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    print("| reply tokens | whole reply at every token (before) | a window (now) | before / now |")
    print("| ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        ids = torch.randint(3, tokenizer.vocab_size, (length,)).tolist()
        before, text_before = seconds(tokenizer, ids, window=False)
        now, text_now = seconds(tokenizer, ids, window=True)
        assert text_now == text_before == tokenizer.decode(ids, skip_special_tokens=True)
        print(f"| {length} | {before * 1000:.1f} ms ({before / length * 1000:.3f} a token) | "
              f"{now * 1000:.1f} ms ({now / length * 1000:.3f} a token) | {before / now:.1f}x |")

if __name__ == "__main__":
    main()
