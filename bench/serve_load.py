"""Load on `minimind serve`: 1, 4, 8 and 16 concurrent clients using the official openai client, and
the first token of short requests while a long prompt is being read.

    python bench/serve_load.py                        # default 26M shape, random weights, ~5 minutes
    python bench/serve_load.py --clients 1,8 --requests 2 --max_tokens 32
    python bench/serve_load.py --rounds 3 --requests 2   # levels in turn, medians: steadier on a busy machine
    python bench/serve_load.py --hidden_size 64 --num_hidden_layers 2   # a tiny model: server overhead
    python bench/serve_load.py --engine_only          # the batching engine alone, no HTTP
    python bench/serve_load.py --clients 1,8 --requests 3 --rounds 4 --long_prompt 0   # the goals' two ratios, ~1 min
    python bench/serve_load.py --engine_only --engine_thread   # ... stepped in a second thread
    OMP_WAIT_POLICY=PASSIVE python bench/serve_load.py --engine_only   # ... its waiting threads asleep
    python bench/serve_load.py --long_prompt 0        # without the long-prompt part
    python bench/serve_load.py --backend llama.cpp    # the server decoding through llama.cpp (ecosystem extra)

Starts `minimind serve` on 127.0.0.1 (a subprocess, as a user would) over a model with random weights
(speed does not depend on their values), then for each level runs that many clients at once, each
sending --requests streamed chat requests one after another (prompts of ~30 tokens, --max_tokens
new tokens, sampled with the server's defaults unless --temperature). Per level: aggregate tokens/s (all completion tokens
over the wall time of the level), p50/p95 latency to the first token and to the end of a reply,
errors, and the ratio of tokens/s to the single client's, the baseline measured in the same run;
then one client's tokens/s against `generate` at batch 1 in this process, run in every round right
after the one client (the same requests, sampling and length, decoding as the `generate` command
does: what the server adds over the decoder). Last, with --long_prompt N, one request
of N prompt tokens, and a short request every --short_every seconds while it is read: their time
to first token (the server's chunked prefill keeps them under a second on 2 laptop cores), and the
long request's own.
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
from concurrent.futures import ThreadPoolExecutor

from minimind.commands.main import set_openmp_waiting

set_openmp_waiting("generate")  # before torch starts its threads: the baseline decodes as `minimind generate` does

import httpx  # noqa: E402
import torch  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from minimind.data.conversations import encode_chat  # noqa: E402
from minimind.data.tokenizer import load_tokenizer  # noqa: E402
from minimind.inference.decoding import generate  # noqa: E402
from minimind.inference.loading import load_for_inference  # noqa: E402
from minimind.inference.prepared import prepare  # noqa: E402
from minimind.inference.serving.engine import BatchingEngine  # noqa: E402
from minimind.inference.settings import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingSettings  # noqa: E402
from minimind.inference.threads import cpu_thread_policy  # noqa: E402
from minimind.model.config import MiniMindConfig  # noqa: E402
from minimind.model.model import MiniMindForCausalLM  # noqa: E402

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


def start_server(folder, port, threads, max_batch_size, max_model_len, backend="torch"):
    threads_flag = ["--num_threads", str(threads)] if threads else []
    process = subprocess.Popen([sys.executable, "-m", "minimind.commands.main", "serve", "--model", folder,
                                "--port", str(port), "--served_model_name", "bench", "--max_batch_size",
                                str(max_batch_size), "--max_model_len", str(max_model_len), "--backend", backend, *threads_flag],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"minimind serve exited with status {process.returncode}")
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


def cpu_seconds(pid):
    """CPU time (user + system) of a process so far, from /proc (Linux); None elsewhere."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, q):
    values = sorted(value for value in values if value == value)  # NaN: a reply with no text (eos first)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def engine_level(engine, tokenizer, clients, requests, sampling):
    """The same load on the engine alone, in this process (no HTTP, no client): `clients` requests in
    flight, each replaced by the next of its client when it finishes. -> (tokens, seconds)."""
    params = dict(max_new_tokens=sampling["max_tokens"])
    if "temperature" in sampling:
        params["temperature"] = sampling["temperature"]
    sent, tokens = [0] * clients, []

    def send(index):
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt(index, sent[index])}])
        sent[index] += 1
        engine.submit(ids, SamplingSettings(**params), lambda update: finished(index, update))

    def finished(index, update):
        if update.finish_reason or update.error:
            tokens.append(update.completion_tokens)
            if sent[index] < requests:
                send(index)

    start = time.perf_counter()
    for index in range(clients):
        send(index)
    while engine.running or engine.waiting:
        engine.step()
    return sum(tokens), time.perf_counter() - start


def measure_server(args, folder, sampling):
    """Every level once per round, the rounds one after another, so that a load that drifts over the
    run (other jobs on the machine) reaches every level alike; per level the median rate."""
    port = free_port()
    server = start_server(folder, port, args.threads, args.max_batch_size, max(args.long_prompt + 64, 512),
                          args.backend)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(run_level(base_url, 1, 1, {"max_tokens": 8}))  # warm-up
        alone = Baseline(args, folder, sampling) if 1 in args.levels else None
        rates, results, errors, cpu = ({clients: [] for clients in args.levels} for _ in range(4))
        for _ in range(args.rounds):
            for clients in args.levels:
                before = cpu_seconds(server.pid), time.process_time()
                level_results, level_errors, wall = asyncio.run(run_level(base_url, clients, args.requests, sampling))
                tokens = sum(tokens for _, _, tokens in level_results)
                rates[clients].append(tokens / wall)
                results[clients] += level_results
                errors[clients] += level_errors
                if before[0] is not None and tokens:
                    cpu[clients].append(((cpu_seconds(server.pid) - before[0]) / tokens,
                                         (time.process_time() - before[1]) / tokens))
                if clients == 1:
                    alone.measure()  # right after the one client: both under the same load
        print("| clients | tokens/s (all) | vs 1 client | first token p50 / p95 | whole reply p50 / p95 | errors |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        baseline = statistics.median(rates[args.levels[0]])
        for clients in args.levels:
            rate = statistics.median(rates[clients])
            first, whole = [r[0] * 1000 for r in results[clients]], [r[1] * 1000 for r in results[clients]]
            print(f"| {clients} | {rate:.1f} | {rate / baseline:.2f}x | {percentile(first, 50):.0f} / "
                  f"{percentile(first, 95):.0f} ms | {percentile(whole, 50):.0f} / {percentile(whole, 95):.0f} ms "
                  f"| {len(errors[clients])} |")
            for error in sorted(set(errors[clients]))[:3]:
                print(f"    error: {error}")
        print("tokens/s of each round: " + "; ".join(
            f"{clients}: {', '.join(f'{r:.1f}' for r in rates[clients])}" for clients in args.levels))
        if all(cpu.values()):
            print("CPU time a completion token, server process / this client process: " + "; ".join(
                f"{clients} client{'s' if clients > 1 else ''}: "
                f"{statistics.median(c[0] for c in cpu[clients]) * 1000:.2f} / "
                f"{statistics.median(c[1] for c in cpu[clients]) * 1000:.2f} ms" for clients in args.levels))
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        print(f"largest batch the engine decoded: {health['largest_batch']}")
        if "decoding_steps_by_threads" in health:
            print("decoding steps on each thread count (the server's ThreadPolicy): "
                  + ", ".join(f"{count} threads: {steps}" for count, steps in health["decoding_steps_by_threads"].items()))
        if alone is not None:
            ratios = [client / decoder for client, decoder in zip(rates[1], alone.rates)]
            print(f"one client {statistics.median(rates[1]):.1f} tokens/s against generate at batch 1 "
                  f"{statistics.median(alone.rates):.1f} tokens/s in this process: {statistics.median(ratios):.2f}x "
                  f"(goal 0.9x; the median of the rounds' ratios: {', '.join(f'{r:.2f}' for r in ratios)})")
        if args.long_prompt:
            asyncio.run(long_prompt_level(base_url, args))
    finally:
        server.terminate()
        server.wait(timeout=60)


def decoder_for(model, tokenizer, backend):
    """What decodes with --backend: the torch decoder, or llama.cpp on a GGUF export."""
    if backend == "llama.cpp":
        from minimind.inference.llama_cpp_backend import LlamaCppModel
        return LlamaCppModel(model, tokenizer)
    return prepare(model)


class Baseline:
    """minimind's `generate` on the one client's requests (same prompts, sampling and max_tokens), in
    this process, decoding as the `generate` command does (its OpenMP setting, set at the top of this
    file, and its thread count timed unless --threads): the decoder alone, without HTTP."""

    def __init__(self, args, folder, sampling):
        if args.threads:
            torch.set_num_threads(args.threads)
        model, self.tokenizer = load_for_inference(folder)
        self.decoder = decoder_for(model, self.tokenizer, args.backend)
        if args.backend == "torch" and not args.threads:
            self.decoder.threads = cpu_thread_policy(self.decoder.device)
        # the server's defaults for what the requests leave out (protocol.sampling_params)
        self.settings = {"max_new_tokens": sampling["max_tokens"], "top_p": DEFAULT_TOP_P,
                         "temperature": sampling.get("temperature", DEFAULT_TEMPERATURE)}
        self.requests, self.rates = args.requests, []
        self.generate(0, {**self.settings, "max_new_tokens": 8})  # warm-up

    def generate(self, request_index, settings):
        ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt(0, request_index)}])
        return len(generate(self.decoder, [ids], tokenizer=self.tokenizer, **settings).token_ids[0])

    def measure(self):
        """One client's requests in turn, as the one-client level sends them: tokens/s."""
        start = time.perf_counter()
        tokens = sum(self.generate(index, self.settings) for index in range(self.requests))
        self.rates.append(tokens / (time.perf_counter() - start))


async def long_prompt_level(base_url, args):
    """One request of --long_prompt random prompt tokens; while it is read, a short chat request every
    --short_every seconds: their times to first token, and the long one's."""
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=1800)
    torch.manual_seed(1)
    long_ids = torch.randint(3, 6400, (args.long_prompt,)).tolist()
    start = time.perf_counter()
    long_done = {}

    async def long_request():
        stream = await client.completions.create(model="bench", prompt=long_ids, max_tokens=16, temperature=0,
                                                 stream=True)
        async for _ in stream:
            long_done.setdefault("first", time.perf_counter() - start)
        long_done["end"] = time.perf_counter() - start

    task = asyncio.create_task(long_request())
    short = []
    index = 0
    while not long_done:
        await asyncio.sleep(args.short_every)
        if long_done:
            break
        sent = time.perf_counter() - start
        first, whole, tokens = await one_request(client, 100 + index, 0, {"max_tokens": 16, "temperature": 0})
        short.append((sent, first, long_done.get("first") is None))
        index += 1
    await task
    await client.close()
    during = [first for _, first, waiting in short if waiting]
    print(f"long prompt: {args.long_prompt} tokens, first token after {long_done['first']:.1f} s "
          f"(its prefill, read in chunks), done after {long_done['end']:.1f} s")
    print(f"short requests sent while it was read: {len(during)}; their first token p50 / max: "
          f"{percentile(during, 50) * 1000:.0f} / {max(during, default=float('nan')) * 1000:.0f} ms (goal < 1000 ms)")


def measure_engine(args, folder, sampling):
    """The levels on the engine alone, --rounds times in turn (medians); with --engine_thread in a
    thread other than the one that loaded the model, as the server ran it before it moved its engine
    into the main thread (a second OpenMP team: docs/serving.md, "Threads")."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(folder)
    engine = BatchingEngine(decoder_for(model, tokenizer, args.backend), tokenizer, max_batch_size=args.max_batch_size, max_queue=1 << 20)

    def levels():
        engine_level(engine, tokenizer, 1, 1, {**sampling, "max_tokens": 8})  # warm-up
        rates = {clients: [] for clients in args.levels}
        for _ in range(args.rounds):
            for clients in args.levels:
                tokens, seconds = engine_level(engine, tokenizer, clients, args.requests, sampling)
                rates[clients].append(tokens / seconds)
        return rates

    if args.engine_thread:
        with ThreadPoolExecutor(1) as pool:
            rates = pool.submit(levels).result()
    else:
        rates = levels()
    where = "a thread of its own" if args.engine_thread else "the main thread"
    print(f"| clients | tokens/s (engine alone, in {where}) | vs 1 client |\n| ---: | ---: | ---: |")
    baseline = statistics.median(rates[args.levels[0]])
    for clients in args.levels:
        rate = statistics.median(rates[clients])
        print(f"| {clients} | {rate:.1f} | {rate / baseline:.2f}x |")
    print("tokens/s of each round: " + "; ".join(
        f"{clients}: {', '.join(f'{r:.1f}' for r in rates[clients])}" for clients in args.levels))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every level this many times, in turn; the table shows the medians")
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: the server's, temperature 0.85 and top_p 0.85)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads (0 = torch's default)")
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--long_prompt", type=int, default=20000,
                        help="prompt tokens of the long request (0 = no long-prompt part)")
    parser.add_argument("--short_every", type=float, default=1.0,
                        help="seconds between the short requests sent while the long prompt is read")
    parser.add_argument("--backend", choices=["torch", "llama.cpp"], default="torch",
                        help="the server's --backend (and the decoder of the `generate` baseline and --engine_only)")
    parser.add_argument("--engine_thread", action="store_true",
                        help="with --engine_only: step the engine in a thread other than the one that loaded the model")
    parser.add_argument("--engine_only", action="store_true",
                        help="drive the BatchingEngine in this process instead: no HTTP, no client")
    args = parser.parse_args()
    args.levels = [int(n) for n in args.clients.split(",")]
    sampling = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    with tempfile.TemporaryDirectory() as folder:
        params = save_random_model(folder, args.hidden_size, args.num_hidden_layers)
        print(f"model: {params:.1f}M parameters (random weights), float32, backend {args.backend}; threads: "
              f"{args.threads or 'default'}; {args.requests} requests per client, {args.max_tokens} new tokens "
              f"each, temperature {'0.85 (the default)' if args.temperature is None else args.temperature}; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        (measure_engine if args.engine_only else measure_server)(args, folder, sampling)
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
