"""Serving throughput: 32 concurrent streaming clients against the same 32 requests one at a time.

Starts `qwenkit serve` (the real command, in a subprocess, on 127.0.0.1) on a random-init
checkpoint made by `qwenkit new`, then sends the same requests twice through the official `openai`
client, streaming: one after another (each waits for the previous to finish), then all at once.
Greedy decoding, so both runs generate the same tokens; throughput is completion tokens (from
each stream's usage) per wall-clock second. Every stream must end with a finish reason, and the
server must be idle afterwards. Batching should beat sequential by at least 3x at 32 clients.

    python benchmarks/bench_server.py [--clients 32] [--max-tokens 64] [--preset tiny] [--layers N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

KEY = "bench"


def make_checkpoint(path: Path, preset: str, layers: int | None) -> Path:
    if not (path / "config.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "qwenkit",
            "new",
            "--preset",
            preset,
            "--seed",
            "0",
            "--dtype",
            "float32",
            "--out",
            str(path),
        ]
        subprocess.run(cmd + (["--layers", str(layers)] if layers else []), check=True, stdout=subprocess.DEVNULL)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_batch: int, max_queue: int, max_model_len: int) -> subprocess.Popen:
    code = (
        "from qwenkit.cli.serve import serve; "
        f"serve(model={str(model)!r}, port={port}, api_key={KEY!r}, max_batch={max_batch}, "
        f"max_queue={max_queue}, max_model_len={max_model_len})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            sys.exit("the server did not start in 120 s")
        time.sleep(0.2)


async def stream_one(client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int) -> tuple[int, float, float]:
    """(completion tokens, seconds to the first content, seconds in all) of one streamed request."""
    start = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Request {i}: tell me about the number {i * 7}."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = finish = None
    async for chunk in stream:
        if chunk.choices:
            if first is None and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    if finish not in ("stop", "length") or usage is None:
        raise RuntimeError(f"request {i}: the stream ended without a finish reason or usage")
    return usage.completion_tokens, first if first is not None else float("nan"), time.perf_counter() - start


async def run(url: str, model: str, clients: int, max_tokens: int, concurrent: bool):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600) as client:
        await stream_one(client, model, -1, 4)  # warm-up: connections, first forward
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(stream_one(client, model, i, max_tokens) for i in range(clients)))
        else:
            results = [await stream_one(client, model, i, max_tokens) for i in range(clients)]
        return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse this folder (made if missing)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(args.checkpoint or Path(tmp) / "model", args.preset, args.layers)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model_dir, port, args.max_batch, max_queue=args.clients, max_model_len=512)
        try:
            name = model_dir.resolve().name
            seq_s, seq = asyncio.run(run(url, name, args.clients, args.max_tokens, concurrent=False))
            con_s, con = asyncio.run(run(url, name, args.clients, args.max_tokens, concurrent=True))
            health = httpx.get(url + "/health").json()
        finally:
            server.terminate()
            server.wait(timeout=30)

    seq_tokens, con_tokens = sum(r[0] for r in seq), sum(r[0] for r in con)
    assert seq_tokens == con_tokens, f"greedy runs generated different token counts: {seq_tokens} vs {con_tokens}"
    assert health["active"] == 0 and health["waiting"] == 0, health

    def row(mode, seconds, results):
        ttft = sorted(r[1] for r in results)
        latency = sorted(r[2] for r in results)
        tokens = sum(r[0] for r in results)
        return (
            f"| {mode} | {len(results)} | {tokens} | {seconds:.2f} | {tokens / seconds:,.0f} | "
            f"{ttft[len(ttft) // 2] * 1000:.0f} | {latency[len(latency) // 2]:.2f} |"
        )

    print(
        f"\nqwenkit serve, preset {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, fp32, "
        f"--max-batch {args.max_batch}; {args.clients} streamed chat requests of {args.max_tokens} tokens, greedy"
    )
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print("| mode | requests | tokens | wall s | tokens/s | median first token ms | median request s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(row("sequential", seq_s, seq))
    print(row("concurrent", con_s, con))
    ratio = (con_tokens / con_s) / (seq_tokens / seq_s)
    print(
        f"\nconcurrent / sequential throughput: {ratio:.1f}x (target: at least 3x); server idle after: "
        f"{health['active']} active, {health['waiting']} waiting"
    )


if __name__ == "__main__":
    main()
