"""Load on `loramem serve`: requests/s and latency for concurrent OpenAI clients asking a PhoneBook memory.

    python benchmarks/server_load.py [--clients 1,4,16] [--requests 8] [--max-batch 16] [--json]
    python benchmarks/server_load.py --load            # 16 clients x 25 requests: errors, peak server RSS

Writes a PhoneBook (default 0.5K: 24 entries) into one rank-4 module of the bundled model (kept in --memory and
reused when run again), starts `loramem serve` on it as a subprocess on 127.0.0.1, and has each client ask
closed-book questions back to back through the official openai client. Latency is per request as the client
sees it; exact match checks the answers are still right under load. `--max-batch 1` turns the server's
micro-batching off, for comparison. The server runs with this process's OMP_NUM_THREADS; its peak RSS is read
from getrusage(RUSAGE_CHILDREN) after it exits (it is this process's only child).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

from common import report

from loramem.bench import phonebook as pb
from loramem.metrics import phone_exact_match

KEY = "bench"


def write_memory(path: Path, model: str, size: str) -> list[pb.Entry]:
    """The PhoneBook in one module (trained once: an identical write is skipped)."""
    from loramem import LoraSpec, Memory

    entries = pb.load(size)
    record = Memory.open(path, model=model, create=True).write(
        pb.examples(entries), lora=LoraSpec(rank=4, layers="late"), name=f"phonebook-{size}", progress=False)
    print(f"memory {path}: {len(entries)} entries, recall {record.recall:.0%}", file=sys.stderr)
    return entries


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(memory: Path, port: int, max_batch: int, window_ms: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "loramem.cli", "serve", "--memory", f"pb={memory}", "--port", str(port),
               "--api-key", KEY, "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms),
               "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).is_success:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start within 300 s")


def run_clients(client: openai.OpenAI, entries: list[pb.Entry], clients: int, requests: int) -> dict:
    """`clients` threads, each asking `requests` questions back to back; latencies, errors, exact match."""
    latencies: list[float] = []
    batches: list[int] = []
    errors, correct = [], 0
    lock = threading.Lock()

    def one_client(index: int) -> None:
        nonlocal correct
        for n in range(requests):
            entry = entries[(index * requests + n) % len(entries)]
            started = time.perf_counter()
            try:
                reply = client.chat.completions.create(
                    model="pb", messages=[{"role": "user", "content": entry.question}], max_tokens=16)
            except openai.OpenAIError as err:
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                batches.append(reply.loramem["batch"])
                correct += phone_exact_match(reply.choices[0].message.content, entry.phone)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": clients * requests, "errors": len(errors),
        "requests_per_second": len(latencies) / wall,
        "p50_seconds": statistics.median(ordered) if ordered else None,
        "p95_seconds": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None,
        "mean_batch": statistics.mean(batches) if batches else None,
        "exact_match": correct / len(latencies) if latencies else None,
        "wall_seconds": wall, "first_errors": errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--phonebook", default="0.5K", help="PhoneBook size written into the memory")
    parser.add_argument("--memory", type=Path, help="where to keep the memory (default: a temporary folder)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: no batching)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="the server's --batch-window-ms")
    parser.add_argument("--load", action="store_true", help="16 clients x 25 requests instead of the sweep")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        memory = args.memory or Path(tmp) / "phonebook.mem"
        entries = write_memory(memory, args.model, args.phonebook)
        port = free_port()
        server = start_server(memory, port, args.max_batch, args.batch_window_ms)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
            run_clients(client, entries, 1, 2)  # warm-up: first merge, first generation
            levels = [(16, 25)] if args.load else [(int(c), args.requests) for c in args.clients.split(",")]
            rows = [run_clients(client, entries, clients, requests) for clients, requests in levels]
        finally:
            server.terminate()
            server.wait(timeout=60)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    result = {"model": args.model, "phonebook": args.phonebook, "max_batch": args.max_batch,
              "batch_window_ms": args.batch_window_ms,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "server_peak_rss_mb": peak_rss_mb, "rows": rows}

    def table() -> None:
        print(f"{args.model}, PhoneBook {args.phonebook}, max batch {args.max_batch}, window {args.batch_window_ms} ms, "
              f"OMP_NUM_THREADS={result['omp_num_threads']}, server peak RSS {peak_rss_mb:.0f} MB")
        print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'batch':>6} {'exact':>6}")
        for row in rows:
            if row["errors"] == row["requests"]:
                print(f"{row['clients']:>7} {row['requests']:>8} {row['errors']:>6}  all failed: {row['first_errors'][0]}")
                continue
            print(f"{row['clients']:>7} {row['requests']:>8} {row['errors']:>6} {row['requests_per_second']:>7.2f} "
                  f"{row['p50_seconds']:>7.3f} {row['p95_seconds']:>7.3f} {row['mean_batch']:>6.1f} {row['exact_match']:>6.0%}")

    report(result, args.json, table)


if __name__ == "__main__":
    main()
