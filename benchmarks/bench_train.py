"""Training throughput and peak memory: qwenkit against transformers, on the same random checkpoint
and the same batches, in one run.

    python benchmarks/bench_train.py [--seq 512] [--batch 4] [--steps 3] [--warmup 1] [--layers 6] [--rounds 2]

Two modes, each library in its own fresh subprocess (so that peak memory is that run's own), in
`--rounds` rounds of ABBA order (transformers then qwenkit, then qwenkit then transformers...);
each library's best round is reported:

- full: every weight trains with AdamW. transformers: `Qwen2ForCausalLM(ids, labels=ids).loss`,
  backward, a plain `torch.optim.AdamW` step. qwenkit: what its trainer runs per step,
  `CausalLMLoss` (the fused, chunked LM head + cross-entropy) and its optimizer (fused AdamW).
- lora: rank 16, alpha 32, on every linear layer of every block. transformers + PEFT
  (`target_modules="all-linear"`) against `qwenkit.lora.apply_lora`; AdamW over the adapters.

The model is a Qwen2.5-shaped config of about 100M parameters (hidden 512, 6 layers, GQA 8/2, the
real 151,936-row tied vocabulary), fp32 on CPU; on a GPU, `--dtype bfloat16` for both. The loss
is over every position (labels = inputs), the case where skipping unlabeled positions saves
nothing. tokens/s is batch x seq over the mean step time after `--warmup` steps (tokens per CPU-s
uses the process's CPU time instead, which moves less when other jobs share the cores); peak memory is
the process's peak RSS on CPU (its baseline after imports subtracted and shown apart) and
`torch.cuda.max_memory_allocated` on GPU. Losses of the first step are printed for both
libraries as a check that they compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch
from machine import bandwidth_now

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 512, 2048, 8, 2, 151936


def make_checkpoint(folder: str, layers: int) -> None:
    from dataclasses import replace

    from qwenkit.config import PRESETS
    from qwenkit.model import QwenForCausalLM

    config = replace(
        PRESETS["qwen2.5-0.5b"],
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    model.to_empty(device="cpu").init_weights(seed=0)
    model.save_pretrained(folder, dtype=torch.float32)


def batches(n: int, batch: int, seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 151643, (batch, seq), generator=g) for _ in range(n)]  # (B, T)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(lib: str, mode: str, folder: str, args) -> dict:
    """One library, one mode, in this process; returns its measurements."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base_rss = peak_rss_mb()
    if lib == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
            )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step(ids):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
    else:
        from qwenkit.finetune.config import FinetuneConfig
        from qwenkit.finetune.loss import CausalLMLoss
        from qwenkit.finetune.strategy import build_optimizer, param_groups, trainable_names
        from qwenkit.lora import apply_lora
        from qwenkit.model import load_model

        model = load_model(folder, dtype=dtype, device=device)
        if mode == "lora":
            apply_lora(model, r=16, alpha=32.0, dropout=0.0, targets="all-linear")
        cfg = FinetuneConfig(model="m", data="d", output="o", method=mode, lr=1e-5, weight_decay=0.01)
        groups = param_groups(model, trainable_names(model, cfg), cfg)
        optimizer = build_optimizer(groups, cfg, fused=True)
        root = CausalLMLoss(model).train()

        def step(ids):
            loss_sum, n = root(ids, ids)
            loss = loss_sum / n
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

    model.train()
    data = [b.to(device) for b in batches(args.warmup + args.steps, args.batch, args.seq)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times, cpu = [], [], []
    for ids in data:
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(ids))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    timed, timed_cpu = times[args.warmup :], cpu[args.warmup :]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb() - base_rss
    return {
        "lib": lib,
        "mode": mode,
        "tokens_per_s": args.batch * args.seq * len(timed) / sum(timed),
        "tokens_per_cpu_s": args.batch * args.seq * len(timed) / sum(timed_cpu),
        "step_s": sum(timed) / len(timed),
        "peak_mb": peak,
        "baseline_mb": base_rss,
        "first_loss": losses[0],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_worker(lib: str, mode: str, folder: str, args) -> dict:
    passed = ("seq", "batch", "steps", "warmup", "device", "dtype", "threads")
    cmd = [sys.executable, __file__, "--worker", lib, mode, folder] + [f"--{k}={getattr(args, k)}" for k in passed]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if out.returncode:
        sys.exit(f"{lib} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs per library and mode, in ABBA order; the best counts"
    )
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    parser.add_argument("--worker", nargs=3, metavar=("LIB", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    with tempfile.TemporaryDirectory() as folder:
        make_checkpoint(folder, args.layers)
        rows = []
        for mode in args.modes.split(","):
            runs = []
            for round_ in range(args.rounds):
                # ABBA order: the machine's speed drifts (its memory bandwidth bursts after a pause),
                # so neither library always runs first.
                order = ("transformers", "qwenkit") if round_ % 2 == 0 else ("qwenkit", "transformers")
                for lib in order:
                    before = bandwidth_now()
                    runs.append(run_worker(lib, mode, folder, args))
                    r = runs[-1]
                    r["bandwidth"] = (before, bandwidth_now())
                    print(
                        f"  round {round_ + 1} {lib:12} {mode:4}  {r['tokens_per_s']:8.1f} tokens/s  "
                        f"peak {r['peak_mb']:8.0f} MB  first loss {r['first_loss']:.5f}  read bandwidth "
                        f"{before / 1e9:.0f} -> {r['bandwidth'][1] / 1e9:.0f} GB/s",
                        file=sys.stderr,
                        flush=True,
                    )
            for lib in ("transformers", "qwenkit"):  # each library's best round
                mine = [r for r in runs if r["lib"] == lib]
                best = max(mine, key=lambda r: r["tokens_per_s"])
                rows.append(
                    {
                        **best,
                        "tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in mine),
                        "peak_mb": min(r["peak_mb"] for r in mine),
                    }
                )

    print(
        f"\nQwen2.5-shaped model: hidden {HIDDEN}, {args.layers} layers, vocab {VOCAB} (tied), "
        f"{rows[0]['parameters'] / 1e6:.1f}M parameters; batch {args.batch} x seq {args.seq}; "
        f"{args.dtype} on {args.device}; {args.steps} timed steps after {args.warmup}; best of {args.rounds} "
        f"rounds in ABBA order"
    )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; read bandwidth beside the counted runs "
        f"{min(min(r['bandwidth']) for r in rows) / 1e9:.0f}-{max(max(r['bandwidth']) for r in rows) / 1e9:.0f} GB/s"
    )
    what = "peak RSS over baseline" if args.device == "cpu" else "peak allocated"
    print(
        f"\n| mode | library | tokens/s | step s | tokens per CPU-s | {what} MB | speed vs transformers "
        f"(wall / CPU) | memory vs transformers |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in args.modes.split(","):
        ref = next(r for r in rows if r["mode"] == mode and r["lib"] == "transformers")
        for r in (x for x in rows if x["mode"] == mode):
            print(
                f"| {mode} | {r['lib']} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | "
                f"{r['tokens_per_cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} / "
                f"{r['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f} | {r['peak_mb'] / ref['peak_mb']:.2f} |"
            )


if __name__ == "__main__":
    main()
