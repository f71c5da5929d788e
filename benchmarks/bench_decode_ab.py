"""Decoding before and after a change: qwenkit at another commit against this tree, in one run.

The same checkpoint is decoded by `qwenkit.load_model(...).generate` of both versions, in
alternating subprocesses (ABBA order over the rounds), greedy, 64 new tokens after a 128-token
prompt, best of three runs each, fp32 and bf16 at batch 1 and 8, with the read bandwidth beside
every run. The other version is `git archive REV` of this repository, unpacked in a temporary
folder; each version builds its own kernels in its own cache folder.

    python benchmarks/bench_decode_ab.py --before 7901022 [--rounds 2] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = (("float32", 1), ("bfloat16", 1), ("bfloat16", 8), ("float32", 8))

# Run in a fresh interpreter with one version's source folder first on sys.path.
WORKER = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import qwenkit
assert qwenkit.__file__.startswith(sys.argv[1]), qwenkit.__file__
sys.path.insert(0, sys.argv[5])
from machine import bandwidth_now
dtype, batch = getattr(torch, sys.argv[3]), int(sys.argv[4])
model = qwenkit.load_model(sys.argv[2], dtype=dtype)
ids = torch.randint(0, 151643, (batch, 128), generator=torch.Generator().manual_seed(1))
def run(n):
    mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=[])
run(4)  # the kernels' build, lazy imports, first touches
runs = []
for _ in range(3):
    before = bandwidth_now()
    t = time.perf_counter(); run(1); prefill = time.perf_counter() - t
    t = time.perf_counter(); run(65); total = time.perf_counter() - t
    runs.append({"tok_s": batch * 64 / (total - prefill), "bandwidth": [before, bandwidth_now()]})
print(json.dumps(runs))
"""


def decode(source: Path, checkpoint: Path, dtype: str, batch: int, cache: Path) -> dict:
    env = dict(os.environ, QWENKIT_CACHE=str(cache))
    command = [sys.executable, "-c", WORKER, str(source), str(checkpoint), dtype, str(batch), str(ROOT / "benchmarks")]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{source} {dtype} batch {batch} failed:\n{out.stderr[-3000:]}")
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    rates = [b / 1e9 for r in runs for b in r["bandwidth"]]
    return {"tok_s": max(r["tok_s"] for r in runs), "bandwidth": (min(rates), max(rates))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit to compare this tree with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "bench-qwen2.5-0.5b"))
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        new = [sys.executable, "-m", "qwenkit", "new", "--preset", "qwen2.5-0.5b", "--out", str(checkpoint)]
        subprocess.run(new, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(before, filter="data")
        sources = {"before": before, "after": ROOT}
        results: dict[tuple, list[dict]] = {}
        for r in range(args.rounds):
            for dtype, batch in CASES:
                for which in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    got = decode(sources[which], checkpoint, dtype, batch, Path(tmp) / f"cache-{which}")
                    results.setdefault((which, dtype, batch), []).append(got)
                    low, high = got["bandwidth"]
                    print(f"round {r + 1} {which:6} {dtype:8} batch {batch}: {got['tok_s']:6.1f} tok/s "
                          f"at {low:.0f}-{high:.0f} GB/s", file=sys.stderr, flush=True)  # fmt: skip
    print(f"\n| dtype | batch | decode tok/s before {args.before} (each round) | after | after / before | bandwidth |")
    print("| --- | ---: | --- | --- | --- | --- |")
    for dtype, batch in CASES:
        old, new = results[("before", dtype, batch)], results[("after", dtype, batch)]
        rates = [x for run in old + new for x in run["bandwidth"]]
        before_s = " / ".join(f"{o['tok_s']:.1f}" for o in old)
        after_s = " / ".join(f"{n['tok_s']:.1f}" for n in new)
        ratios = " / ".join(f"{n['tok_s'] / o['tok_s']:.2f}" for o, n in zip(old, new))
        print(f"| {dtype} | {batch} | {before_s} | {after_s} | {ratios} | {min(rates):.0f}-{max(rates):.0f} GB/s |")


if __name__ == "__main__":
    main()
