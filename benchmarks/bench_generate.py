"""Generation speed: qwenkit against transformers' `generate`, same checkpoint, same prompts.

A random-init Qwen2.5-0.5B-shaped checkpoint (made by `qwenkit new`), greedy, a 128-token prompt
and 64 new tokens, fp32 and bf16, batch 1 and 8. Each library runs its own `generate`, alternating,
best of --repeats. Prefill is the time to the first token; decode is the rest. The roofline is
the bytes of weights read per decoded token against this machine's read bandwidth, measured here
beside every run: the machine moves between bandwidth regimes over minutes, so at batch 1 each
library decodes --share-runs more times, each run between two readings, and the share is the
median over those runs of tok/s against the roofline of the higher of its two readings.

    python benchmarks/bench_generate.py [--repeats 2] [--share-runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import bandwidth_now, read_bandwidth, timed

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEW = 128, 64


def status_kb(field: str) -> int:
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024


def reset_peak() -> int:
    """Reset the RSS high-water mark; returns the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS")


def decode_bytes(model) -> int:
    """Bytes of weights read per decoded token: all of them but the embedding table, of which one
    row is looked up; unless the head is tied to it, when the head reads it whole."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    table = model.model.embed_tokens.weight
    return total - (table.numel() * table.element_size() if model.lm_head is not None else 0)


def ensure_checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qwenkit",
                "new",
                "--preset",
                "qwen2.5-0.5b",
                "--seed",
                "0",
                "--out",
                str(path),
                "--no-tokenizer",
            ],
            check=True,
        )
    return path


def bracketed_runs(fn, model, ids, mask, runs: int) -> list[tuple[float, float]]:
    """[(decode tok/s, bandwidth)] of `runs` runs, each between two bandwidth readings, the higher
    of which is the run's own. A regime holds for minutes, so most runs see one throughout; the
    median share is robust to the odd run during which it changed (read too low) or burst (too
    high), where a row's single highest reading set against its best run is not."""
    out = []
    for _ in range(runs):
        before = bandwidth_now()
        decode = measure(fn, model, ids, mask)[1]
        out.append(((NEW - 1) / decode, max(before, bandwidth_now())))
    return out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run_qwenkit(model, ids, mask, n):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=[])


def run_hf(model, ids, mask, n):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )


def measure(fn, model, ids, mask):
    """(prefill s, decode s for NEW-1 tokens, output ids)."""
    gc.collect()
    with torch.inference_mode():
        prefill = timed(lambda: fn(model, ids, mask, 1))
        t = time.perf_counter()
        out = fn(model, ids, mask, NEW)
        total = time.perf_counter() - t
    return prefill, max(total - prefill, 1e-9), out


def probe_memory(library: str, folder: str, dtype_name: str, batch: int) -> None:
    """Run in a fresh process: load one library's model and generate; print the peak resident
    memory above the process's state after its imports (weights + loading + generation)."""
    dtype = getattr(torch, dtype_name)
    if library == "transformers":
        from transformers import AutoModelForCausalLM

        load = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()  # noqa: E731
        run = run_hf
    else:
        import qwenkit

        load = lambda: qwenkit.load_model(folder, dtype=dtype)  # noqa: E731
        run = run_qwenkit
    torch.ones(1)
    base = reset_peak()
    model = load()
    ids = torch.randint(0, 151643, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        run(model, ids, torch.ones_like(ids), NEW)
    print(status_kb("VmHWM") - base)


def peak_memory(library: str, folder: Path, dtype: torch.dtype, batch: int) -> int:
    """The lower of two fresh processes' peaks (a single reading moves by up to 100 MiB)."""
    return min(_peak_memory(library, folder, dtype, batch) for _ in range(2))


def _peak_memory(library: str, folder: Path, dtype: torch.dtype, batch: int) -> int:
    result = subprocess.run(
        [sys.executable, __file__, "--probe", library, str(folder), str(dtype).removeprefix("torch."), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        return probe_memory(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--share-runs", type=int, default=5, help="bracketed runs per library at batch 1 for the roofline share"
    )
    parser.add_argument("--int8", action="store_true", help="also compare int8 weight-only quantization")
    parser.add_argument("--quick", action="store_true", help="batch 1, fp32 only (a smoke run)")
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "bench-qwen2.5-0.5b"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import qwenkit

    folder = ensure_checkpoint(Path(args.checkpoint))
    burst, bandwidth = read_bandwidth()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s sustained "
        f"({burst / 1e9:.1f} GB/s burst)"
    )
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    batches = [1] if args.quick else [1, 8]
    rows = []
    for dtype in dtypes:
        ours = qwenkit.load_model(folder, dtype=dtype)
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        read = decode_bytes(ours)  # bytes per token at batch 1: every weight read once
        warm = torch.randint(0, 151643, (1, PROMPT), generator=torch.Generator().manual_seed(99))
        with torch.inference_mode():  # first calls (kernel builds, lazy imports, first touches) untimed
            for fn, model in ((run_qwenkit, ours), (run_hf, theirs)):
                fn(model, warm, torch.ones_like(warm), 4)
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(0, 151643, (batch, PROMPT), generator=gen)
            mask = torch.ones_like(ids)
            results = {}
            for _ in range(args.repeats):  # alternate the libraries, keep each one's best
                for name, fn, model in (("qwenkit", run_qwenkit, ours), ("transformers", run_hf, theirs)):
                    r = measure(fn, model, ids, mask)
                    old = results.get(name)
                    results[name] = r if old is None else (min(old[0], r[0]), min(old[1], r[1]), r[2])
            same = torch.equal(results["qwenkit"][2], results["transformers"][2])
            match = (results["qwenkit"][2][:, PROMPT:] == results["transformers"][2][:, PROMPT:]).float().mean().item()
            row = {
                "dtype": str(dtype).removeprefix("torch."),
                "batch": batch,
                "same": same,
                "match": match,
                "read": read,
            }
            if batch == 1:  # the share of the roofline: per run, against that run's own readings
                libraries = (("qwenkit", run_qwenkit, ours), ("transformers", run_hf, theirs))
                row["runs"] = {
                    name: bracketed_runs(fn, model, ids, mask, args.share_runs) for name, fn, model in libraries
                }
            for name, (pre, dec, _) in results.items():
                row[name] = (batch * PROMPT / pre, batch * (NEW - 1) / dec, peak_memory(name, folder, dtype, batch))
            rows.append(row)
            print(format_row(row), flush=True)
        del ours, theirs
        gc.collect()
    print(f"read bandwidth at the end {bandwidth_now(2.0) / 1e9:.1f} GB/s")
    print()
    print(table(rows))
    if args.int8:
        print()
        print(int8_report(folder, args.repeats))
        print()
        print(agreement_report())


def int8_report(folder: Path, repeats: int) -> str:
    """qwenkit int8 against qwenkit fp32 and bf16 at batch 1: weight memory, decode speed, and
    agreement (greedy tokens, logits) with the fp32 model; int8 decoding both through qwenkit's
    native kernel and through PyTorch's `_weight_int8pack_mm`."""
    import qwenkit
    from qwenkit.cpu import ops

    ids = torch.randint(0, 151643, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    reference = qwenkit.load_model(folder, dtype=torch.float32)
    with torch.inference_mode():
        ref_logits = reference(ids).logits
    ref_out = None
    lines = [
        "| model | weight MiB | decode tok/s (batch 1, best) | share of roofline (median, range; bandwidths) | "
        "greedy tokens equal to fp32 | "
        "logit error vs fp32 (max / mean) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    native_int8 = ops.gemv_int8
    for name in ("float32", "bfloat16", "int8", "int8, PyTorch's kernel"):
        model = (
            reference
            if name == "float32"
            else qwenkit.load_model(folder, dtype=torch.bfloat16 if name == "bfloat16" else torch.float32)
        )
        if name.startswith("int8"):
            qwenkit.quantize(model)
        # The last row decodes through torch's _weight_int8pack_mm instead of qwenkit's int8 kernel.
        ops.gemv_int8 = (lambda *a: None) if name == "int8, PyTorch's kernel" else native_int8
        nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        read = decode_bytes(model)
        runs = bracketed_runs(run_qwenkit, model, ids, mask, max(repeats, 3))
        shares = [tok / (bandwidth / read) for tok, bandwidth in runs]
        out = run_qwenkit(model, ids, mask, NEW)
        ref_out = out if ref_out is None else ref_out
        with torch.inference_mode():
            err = (model(ids).logits.float() - ref_logits).abs()
        tok_s, rates = max(tok for tok, _ in runs), [bandwidth / 1e9 for _, bandwidth in runs]
        lines.append(
            f"| {name} | {nbytes / 2**20:.0f} | {tok_s:.1f} | {median(shares):.0%} ({min(shares):.0%}-"
            f"{max(shares):.0%}) at {min(rates):.0f}-{max(rates):.0f} GB/s | "
            f"{(out[:, PROMPT:] == ref_out[:, PROMPT:]).float().mean():.0%} | "
            f"{err.max():.3f} / {err.mean():.4f} |"
        )
    ops.gemv_int8 = native_int8
    return "\n".join(lines)


PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for learning French.",
]


def agreement_report() -> str:
    """On real weights (the default model), how far bf16 and int8 move from fp32: greedy tokens
    over 64 new tokens of four chat prompts, and the logits on those prompts. Random weights give
    near-flat logits, where any rounding flips the argmax, so they cannot tell this."""
    import qwenkit
    from qwenkit.hub import resolve_model
    from qwenkit.text import encode_prompt

    folder = resolve_model(None)
    tok = qwenkit.load_tokenizer(folder)
    prompts = [torch.tensor([encode_prompt(tok, p)]) for p in PROMPTS]
    reference = qwenkit.load_model(folder, dtype=torch.float32)
    lines = [
        "| SmolLM2-135M-Instruct (real weights) | greedy tokens equal to fp32 | logit error vs fp32 (max / mean) |",
        "| --- | ---: | --- |",
    ]
    with torch.inference_mode():
        ref = [(reference(ids).logits, run_qwenkit(reference, ids, torch.ones_like(ids), NEW)) for ids in prompts]
        for name in ("bfloat16", "int8"):
            model = qwenkit.load_model(folder, dtype=torch.bfloat16 if name == "bfloat16" else torch.float32)
            if name == "int8":
                qwenkit.quantize(model)
            same, total, errs = 0, 0, []
            for ids, (logits, out) in zip(prompts, ref):
                mine = run_qwenkit(model, ids, torch.ones_like(ids), NEW)
                same += int((mine[:, ids.shape[1] :] == out[:, ids.shape[1] :]).sum())
                total += out.shape[1] - ids.shape[1]
                errs.append((model(ids).logits.float() - logits).abs())
            err = torch.cat([e.flatten() for e in errs])
            lines.append(f"| {name} | {same / total:.0%} | {err.max():.3f} / {err.mean():.4f} |")
    return "\n".join(lines)


def format_row(r) -> str:
    q, t = r["qwenkit"], r["transformers"]
    return (
        f"{r['dtype']} batch {r['batch']}: prefill {q[0]:.0f} vs {t[0]:.0f} tok/s ({q[0] / t[0]:.2f}x), "
        f"decode {q[1]:.1f} vs {t[1]:.1f} tok/s ({q[1] / t[1]:.2f}x), peak {q[2] / 2**20:.0f} vs "
        f"{t[2] / 2**20:.0f} MiB, same tokens: {r['same']} ({r['match']:.0%})"
    )


def table(rows) -> str:
    lines = [
        "| dtype | batch | prefill tok/s qwenkit / transformers (ratio) | decode tok/s qwenkit / transformers "
        "(ratio) | decode share of roofline (qwenkit / transformers) | peak MiB (load + generate) qwenkit / "
        "transformers | same tokens |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        q, t = r["qwenkit"], r["transformers"]
        share = ""
        if "runs" in r:
            parts = []
            for name in ("qwenkit", "transformers"):
                shares = [tok / (bandwidth / r["read"]) for tok, bandwidth in r["runs"][name]]
                parts.append(f"{median(shares):.0%} ({min(shares):.0%}-{max(shares):.0%})")
            rates = [bandwidth for runs in r["runs"].values() for _, bandwidth in runs]
            share = (
                f"{parts[0]} / {parts[1]}, median (range) of {len(r['runs']['qwenkit'])} runs each, "
                f"at {min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f} GB/s"
            )
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {q[0]:.0f} / {t[0]:.0f} ({q[0] / t[0]:.2f}x) | "
            f"{q[1]:.1f} / {t[1]:.1f} ({q[1] / t[1]:.2f}x) | {share} | {q[2] / 2**20:.0f} / "
            f"{t[2] / 2**20:.0f} | {'yes' if r['same'] else format(r['match'], '.0%')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
