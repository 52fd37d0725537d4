"""Load on `minimind serve`: 1, 4, 8 and 16 concurrent clients using the official openai client.

    python bench/serve_load.py                        # default 26M shape, random weights, ~3 minutes
    python bench/serve_load.py --clients 1,8 --requests 2 --max_tokens 32
    python bench/serve_load.py --hidden_size 64 --num_hidden_layers 2   # a tiny model: server overhead

Starts `minimind serve` on 127.0.0.1 (a subprocess, as a user would) over a model with random weights
(speed does not depend on their values), then for each level runs that many clients at once, each
sending --requests streamed chat requests one after another (prompts of ~30 tokens, --max_tokens
new tokens, sampled with the server's defaults unless --temperature). Per level: aggregate tokens/s (all completion tokens
over the wall time of the level), p50/p95 latency to the first token and to the end of a reply,
errors, and the ratio of tokens/s to the single client's, the baseline measured in the same run.
"""
import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch
from openai import AsyncOpenAI

from minimind.config import MiniMindConfig
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import load_tokenizer

WORDS = "the river town of Velwen lies in the north where quiet boats carry salt and stories".split()


def save_random_model(folder, hidden_size, num_hidden_layers):
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    model = MiniMindForCausalLM(config)
    model.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) / 1e6


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def start_server(folder, port, threads, max_batch_size):
    environment = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    process = subprocess.Popen([sys.executable, "-m", "minimind.cli", "serve", "--model", folder, "--port", str(port),
                                "--served_model_name", "bench", "--max_batch_size", str(max_batch_size)],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"minimind serve exited: {process.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("minimind serve did not start in 5 minutes")


def prompt(client_index, request_index):
    """A different ~30-token question per request, so no two rows are the same."""
    start = (client_index * 7 + request_index * 3) % len(WORDS)
    return "Tell me about " + " ".join((WORDS[start:] + WORDS)[:24]) + "."


async def one_request(client, client_index, request_index, sampling):
    """One streamed chat request -> (seconds to first token, seconds to the end, completion tokens)."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": prompt(client_index, request_index)}],
        stream=True, stream_options={"include_usage": True}, **sampling)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else float("nan"), time.perf_counter() - start, tokens


async def run_level(base_url, clients, requests, sampling):
    """`clients` concurrent clients, each sending `requests` requests in turn."""
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    results, errors = [], []

    async def one_client(index):
        for request_index in range(requests):
            try:
                results.append(await one_request(client, index, request_index, sampling))
            except Exception as error:  # counted and shown: the goal is zero
                errors.append(f"{type(error).__name__}: {error}")

    start = time.perf_counter()
    await asyncio.gather(*(one_client(index) for index in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return results, errors, wall


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: the server's, temperature 0.85 and top_p 0.85)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads (0 = torch's default)")
    parser.add_argument("--max_batch_size", type=int, default=16)
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    sampling = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature

    with tempfile.TemporaryDirectory() as folder:
        params = save_random_model(folder, args.hidden_size, args.num_hidden_layers)
        port = free_port()
        server = start_server(folder, port, args.threads, args.max_batch_size)
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            asyncio.run(run_level(base_url, 1, 1, {"max_tokens": 8}))  # warm-up
            print(f"model: {params:.1f}M parameters (random weights), float32; server threads: "
                  f"{args.threads or 'torch default'}; {args.requests} requests per client, {args.max_tokens} "
                  f"new tokens each, temperature {'server default' if args.temperature is None else args.temperature}; load average before: {os.getloadavg()[0]:.2f}")
            print("| clients | tokens/s (all) | vs 1 client | first token p50 / p95 | whole reply p50 / p95 | errors |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: |")
            baseline = None
            for clients in levels:
                results, errors, wall = asyncio.run(run_level(base_url, clients, args.requests, sampling))
                rate = sum(tokens for _, _, tokens in results) / wall
                baseline = baseline or rate
                first = [r[0] * 1000 for r in results]
                whole = [r[1] * 1000 for r in results]
                print(f"| {clients} | {rate:.1f} | {rate / baseline:.2f}x | {percentile(first, 50):.0f} / "
                      f"{percentile(first, 95):.0f} ms | {percentile(whole, 50):.0f} / {percentile(whole, 95):.0f} ms "
                      f"| {len(errors)} |", flush=True)
                for error in sorted(set(errors))[:3]:
                    print(f"    error: {error}")
            largest = httpx.get(f"http://127.0.0.1:{port}/health").json()["largest_batch"]
            print(f"largest batch the engine decoded: {largest}; load average after: {os.getloadavg()[0]:.2f}")
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
