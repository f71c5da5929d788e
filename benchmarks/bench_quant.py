"""Quantized GGUF decoding: qwenkit against llama.cpp on the same files.

Models: the real SmolLM2-135M-Instruct (qwenkit's default model) and random-init checkpoints of
the Qwen2.5-0.5B and Qwen2.5-7B shapes; each as F32 (not at 7B), BF16, Q8_0, Q4_0 and Q4_K_M GGUF
files made by llama.cpp's own converter and llama-quantize (benchmarks/quant_files.py, cached
under ~/.cache/qwenkit/bench-quant/ and made on first use). For each file, alternating the two
libraries, best of --repeats rounds:

- decode tok/s at batch 1 after a 128-token context: llama.cpp's `llama-bench -p 0 -n N -d 128`;
  qwenkit's greedy `qwenkit.generate.generate` after a 128-token prompt, the tokens after the first;
- prefill tok/s of a 512-token prompt: `llama-bench -p 512 -n 0`; qwenkit's time to the first token;
- peak RSS of the whole process, read the same way for both (GNU time's %M of each child):
  llama.cpp the higher of its two processes (decode, prefill), qwenkit one fresh process per file
  that loads the file with `qwenkit.load_model(FILE.gguf)` and does both (its imports included:
  the JSON also holds its RSS after `import torch, qwenkit`, "base_rss");
- the share of the bandwidth roofline: tok/s against the read bandwidth of the moment
  (benchmarks/machine.py, read before and after every run, the higher reading the run's) over
  the bytes that one decoded token reads, the sizes in the file of every tensor but the token
  embedding (which is read whole as the head when the file has no output.weight).

Each library gets --threads threads (2: the cores of the project's machine), does --reps timed
repetitions per process after its own untimed warm-up, and the best is kept. A qwenkit row that
cannot be measured (a type `load_model` does not read yet, say) prints "n/a (the error)" and the
rest goes on.

The machine must be otherwise idle. llama.cpp's threads spin at their barriers, so one other busy
process on a 2-core machine makes its decode collapse (SmolLM2 Q4_0: 2 to 20 tok/s instead of
170). So before each run the script waits (up to --quiet-wait seconds) until other processes use
under 10% of the cores; during each run it reads the CPU time other processes used (/proc/stat
less the child's own); a run they took more than 10% of is taken again (up to --retries times),
and only the undisturbed runs count where there are some. The "busy" column says how much the
runs that count were shared.

llama.cpp's tools are built from the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp by
benchmarks/build_llama_cpp.sh (about 6 minutes; -DGGML_NATIVE=ON, Release), into
~/.cache/qwenkit/llama.cpp-0.3.36 ($QWENKIT_LLAMA_CPP overrides). The converter also needs
`sentencepiece` in this Python.

    benchmarks/build_llama_cpp.sh
    python benchmarks/bench_quant.py [--models smollm2,0.5b,7b] [--types Q8_0,Q4_0,Q4_K_M]
        [--repeats 2] [--reps 3] [--new 64] [--only llama.cpp|qwenkit] [--quick] [--json out.json]

--quick (one round, one repetition, 32 new tokens) takes about 5 minutes for SmolLM2 and 0.5B on
an idle machine, once the files exist; making them takes about a minute (the 7B files about 14
minutes and 36 GB: benchmarks/quant_files.py --models 7b makes them ahead).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import quant_files as files
from machine import bandwidth_now, read_bandwidth

CONTEXT, PROMPT = 128, 512
LIBRARIES = ("llama.cpp", "qwenkit")
BUSY = 0.1  # above this share of the cores used by other processes during a run, it is taken again
TIME = "/usr/bin/time"  # GNU time (Debian/Ubuntu package `time`): each child's own peak RSS
QUANTIZED = ("Q8_0", "Q4_0", "Q4_K_M")


# --- measuring one file, in child processes --------------------------------------------------


def run_child(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` under GNU time: {"rc", "stdout", "stderr", "rss" (its peak resident bytes),
    "others" (the share of all cores that other processes used while it ran)}.

    Not the rusage of a child of this process: a child's peak RSS starts from its parent's at the
    fork (Linux keeps the high-water mark across exec), and this process holds torch and a 512 MiB
    bandwidth probe. /usr/bin/time is small, so what it reports is the command's own."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as usage:
        stat = cpu_jiffies()
        proc = subprocess.Popen(
            [TIME, "-f", "%M %U %S", "-o", usage.name, *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a timeout kills the command too, not only time
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\nkilled after {timeout:.0f} s"
        busy, total = (b - a for a, b in zip(stat, cpu_jiffies()))
        lines = usage.read().strip().splitlines()  # "Command exited with non-zero status N" first, if so
        rss_kb, user, system = (float(v) for v in lines[-1].split()) if lines else (0.0, 0.0, 0.0)
    own = (user + system) * os.sysconf("SC_CLK_TCK")
    return {
        "rc": proc.returncode,
        "stdout": out,
        "stderr": err,
        "rss": int(rss_kb) * 1024,
        "others": max(busy - own, 0) / max(total, 1),
    }


def failure(result: dict, what: str) -> str:
    """What went wrong in a child, in one line: its exit (a signal by name), then the innermost
    Python frame of a crash (faulthandler's dump) or else its last line of stderr."""
    rc = result["rc"]
    why = f"killed by {signal.Signals(rc - 128).name}" if 128 < rc < 128 + 65 else f"exit status {rc}"
    lines = [line.strip() for line in result["stderr"].strip().splitlines() if line.strip()]
    frames = [line for line in lines if line.startswith('File "')]
    detail = f"in {frames[0]}" if frames else lines[-1] if lines else ""
    return f"{what}: {why}" + (f", {detail}" if detail else "")


def llama_bench(path: Path, args, test: list[str]) -> tuple[float, dict]:
    """(best tok/s, run_child's result) of one llama-bench process running `test`."""
    cmd = [str(files.llama_tool("llama-bench")), "-m", str(path), "-t", str(args.threads)]
    cmd += ["-r", str(args.reps), "-o", "json", *test]
    result = run_child(cmd, timeout_for(path))
    if result["rc"] != 0:
        raise RuntimeError(failure(result, "llama-bench"))
    (record,) = json.loads(result["stdout"])
    result["build"] = record.get("build_commit", "?")
    return max(record["samples_ts"]), result


def measure_llama(path: Path, args) -> dict:
    """Decode and prefill, each its own llama-bench process (-d applies to every test of one)."""
    decode, a = llama_bench(path, args, ["-p", "0", "-n", str(args.new), "-d", str(CONTEXT)])
    prefill, b = llama_bench(path, args, ["-p", str(PROMPT), "-n", "0"])
    rss, others = max(a["rss"], b["rss"]), max(a["others"], b["others"])
    return {"decode": decode, "prefill": prefill, "rss": rss, "others": others, "build": a["build"]}


def measure_qwenkit(path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--new", str(args.new), "--reps", str(args.reps)]
    cmd += ["--threads", str(args.threads)]
    result = run_child(cmd, timeout_for(path), env={"OMP_NUM_THREADS": str(args.threads)})
    last = result["stdout"].strip().splitlines()[-1:] or ["{}"]
    try:
        report = json.loads(last[0])
    except ValueError:
        report = {}
    if result["rc"] != 0 or "error" in report or "decode" not in report:
        raise RuntimeError(report.get("error") or failure(result, "qwenkit"))
    return {**report, "rss": result["rss"], "others": result["others"]}


def timeout_for(path: Path) -> float:
    return 600 + 120 * path.stat().st_size / 1e9


def child(path: str, new: int, reps: int, threads: int) -> None:
    """In a fresh process: load one GGUF with qwenkit.load_model, then time prefill of PROMPT
    tokens and greedy decoding of `new` tokens after CONTEXT; prints one JSON line (or the error)."""
    faulthandler.enable()  # a crash in native code names its Python frame on stderr
    try:
        import torch

        import qwenkit
        from qwenkit.generate import SamplingParams, generate

        torch.set_num_threads(threads)
        base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
        start = time.perf_counter()
        model = qwenkit.load_model(path)
        load = time.perf_counter() - start
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size

        def first_token_s(ids) -> float:
            t = time.perf_counter()
            next(generate(model, ids, None, SamplingParams(max_new_tokens=1)))
            return time.perf_counter() - t

        def decode_s(ids, n) -> float:
            steps = generate(model, ids, None, SamplingParams(max_new_tokens=n + 1))
            next(steps)  # the context's prefill and the first token
            t = time.perf_counter()
            for _ in steps:  # n decode steps
                pass
            return time.perf_counter() - t

        prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen)
        context = torch.randint(0, vocab, (1, CONTEXT), generator=gen)
        with torch.inference_mode():
            first_token_s(prompt)  # untimed: kernel builds, first touches of the weights
            decode_s(context, 4)
            prefill = min(first_token_s(prompt) for _ in range(reps))
            decode = min(decode_s(context, new) for _ in range(reps))
        report = {"decode": new / decode, "prefill": PROMPT / prefill, "load_s": load, "base_rss": base}
    except Exception as e:  # any failure is this row's "n/a", not the benchmark's end
        report = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    print(json.dumps(report), flush=True)


# --- the machine around each run -------------------------------------------------------------


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)  # idle and iowait are not busy


def wait_quiet(limit: float, threshold: float = 0.1) -> float:
    """Wait (up to `limit` seconds) until other processes use under `threshold` of the cores over
    half a second; returns the last share seen."""
    deadline = time.monotonic() + limit
    while True:
        before = cpu_jiffies()
        time.sleep(0.5)
        busy, total = (b - a for a, b in zip(before, cpu_jiffies()))
        share = busy / max(total, 1)
        if share < threshold or time.monotonic() > deadline:
            return share


def bracketed(fn, path: Path, args) -> tuple[dict | str, float]:
    """(fn's result, or its error as text; the run's bandwidth: the higher of a reading just
    before and one just after). Waits for a quiet machine first (up to --quiet-wait seconds)."""
    wait_quiet(args.quiet_wait)
    before = bandwidth_now()
    try:
        result = fn(path, args)
    except Exception as e:  # noqa: BLE001 - a row's "n/a (why)"; the other rows go on
        result = str(e)
    return result, max(before, bandwidth_now())


def decode_read_bytes(path: Path) -> int:
    """Bytes of weights one decoded token reads: every tensor of the file but the token embedding,
    of which one row is looked up, unless the file has no output.weight and the head reads it."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


# --- the benchmark ---------------------------------------------------------------------------


def bench_file(model: str, type_: str, args) -> dict:
    row = {"model": model, "type": type_}
    try:
        path = files.ensure_gguf(model, type_, log=lambda m: print(f"  {m}", flush=True))
    except Exception as e:  # noqa: BLE001
        row["error"] = f"file: {e}"
        return row
    row.update(file=str(path), file_bytes=path.stat().st_size, read_bytes=decode_read_bytes(path))
    measure = {"llama.cpp": measure_llama, "qwenkit": measure_qwenkit}
    names = [n for n in LIBRARIES if args.only in (None, n)]
    runs = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # ABBA: neither always goes first
            for _ in range(1 + args.retries):  # a run that shared the CPU is taken again
                result, bandwidth = bracketed(measure[name], path, args)
                runs[name].append({"result": result, "bandwidth": bandwidth})
                show = (
                    f"n/a ({result})"
                    if isinstance(result, str)
                    else f"decode {result['decode']:.1f}, prefill {result['prefill']:.0f} tok/s, peak RSS "
                    f"{result['rss'] / 2**20:.0f} MiB, other processes {result['others']:.0%} of the CPU"
                )
                print(f"  {name} {model} {type_}: {show}; {bandwidth / 1e9:.0f} GB/s", flush=True)
                if isinstance(result, str) or result["others"] <= BUSY:
                    break
    for name, these in runs.items():
        good = [run for run in these if isinstance(run["result"], dict)]
        quiet = [run for run in good if run["result"]["others"] <= BUSY]
        good = quiet or good  # the runs that had the CPU to themselves, where there are some
        if not good:
            row[name] = {"error": these[-1]["result"].replace(str(path), path.name)}
            continue
        shares = [run["result"]["decode"] * row["read_bytes"] / run["bandwidth"] for run in good]
        row[name] = {
            "decode": max(run["result"]["decode"] for run in good),
            "prefill": max(run["result"]["prefill"] for run in good),
            "rss": min(run["result"]["rss"] for run in good),
            "share": statistics.median(shares),
            "shares": shares,
            "bandwidths": [run["bandwidth"] for run in good],
            "others": [run["result"]["others"] for run in good],
            **{k: v for k, v in good[-1]["result"].items() if k in ("build", "load_s", "base_rss")},
        }
    return row


def targets(row: dict) -> list[tuple[str, bool | None]]:
    """The issue's targets for this row, each (what, met?); None where a side was not measured."""
    ours, theirs = row.get("qwenkit", {}), row.get("llama.cpp", {})
    measured = "decode" in ours and "decode" in theirs

    def check(what: str, ok) -> tuple[str, bool | None]:
        return what, (ok() if measured else None)

    out = []
    if row["type"] in QUANTIZED and row["model"] != "7b":
        out.append(check("decode >=1.25x", lambda: ours["decode"] >= 1.25 * theirs["decode"]))
    else:
        out.append(check("decode >=1.0x", lambda: ours["decode"] >= theirs["decode"]))
    if row["model"] == "7b":
        out.append(check("roofline >=85%", lambda: ours["share"] >= 0.85))
    out.append(check("prefill >=1.0x", lambda: ours["prefill"] >= theirs["prefill"]))
    out.append(check("RSS <=1.1x", lambda: ours["rss"] <= 1.1 * theirs["rss"]))
    return out


def _pair(row: dict, key: str, fmt: str, scale: float = 1.0, why: bool = False) -> tuple[str, str]:
    """("llama.cpp / qwenkit", "qwenkit / llama.cpp ratio") cells; "n/a" for a side that failed
    (with its error where `why`), "-" for one not measured (--only)."""
    cells = []
    for name in LIBRARIES:
        side = row.get(name)
        if side is None:
            cells.append("-")
        elif "error" in side:
            cells.append(f"n/a ({side['error']})" if why else "n/a")
        else:
            cells.append(format(side[key] * scale, fmt))
    both = all(key in row.get(name, {}) for name in LIBRARIES)
    return " / ".join(cells), f"{row['qwenkit'][key] / row['llama.cpp'][key]:.2f}x" if both else ""


def table(rows: list[dict]) -> str:
    lines = [
        "| model | type | file MB | decode tok/s llama.cpp / qwenkit | ratio | roofline share llama.cpp / qwenkit "
        "| prefill tok/s llama.cpp / qwenkit | ratio | peak RSS MiB llama.cpp / qwenkit | ratio | GB/s | busy "
        "| targets |",
        "| --- | --- | ---: | --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['type']} | | n/a ({row['error']}) | | | | | | | | | |")
            continue
        decode, decode_ratio = _pair(row, "decode", ".1f", why=True)
        share, _ = _pair(row, "share", ".0%")
        prefill, prefill_ratio = _pair(row, "prefill", ".0f")
        rss, rss_ratio = _pair(row, "rss", ".0f", scale=2**-20)
        sides = [row[name] for name in LIBRARIES if "bandwidths" in row.get(name, {})]
        rates = [b / 1e9 for side in sides for b in side["bandwidths"]]
        rate = f"{min(rates):.0f}-{max(rates):.0f}" if rates else ""
        busy = f"{max(b for side in sides for b in side['others']):.0%}" if sides else ""
        goals = ", ".join(f"{what}: {'-' if ok is None else 'yes' if ok else 'no'}" for what, ok in targets(row))
        lines.append(
            f"| {row['model']} | {row['type']} | {row['file_bytes'] / 1e6:.0f} | {decode} | {decode_ratio} | {share} "
            f"| {prefill} | {prefill_ratio} | {rss} | {rss_ratio} | {rate} | {busy} | {goals} |"
        )
    notes = [
        "file MB: the GGUF's size. Decode at batch 1 after a 128-token context, prefill of a 512-token prompt, "
        "best runs. Roofline share: median over runs of tok/s x bytes read per token / the run's bandwidth. "
        "Peak RSS: the whole process (load + both measurements). GB/s: the bandwidth readings beside the runs. "
        "busy: the most CPU other processes used during a run. Ratios: qwenkit / llama.cpp.",
    ]
    return "\n".join(lines + [""] + notes)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        p = argparse.ArgumentParser()
        p.add_argument("--child")
        for flag in ("--new", "--reps", "--threads"):
            p.add_argument(flag, type=int)
        a = p.parse_args()
        return child(a.child, a.new, a.reps, a.threads)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,0.5b", help=f"comma-separated, of {','.join(files.MODELS)}")
    parser.add_argument("--types", default=",".join(files.TYPES), help="comma-separated GGUF types")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per file, alternating the libraries")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per process (llama-bench -r)")
    parser.add_argument("--new", type=int, default=64, help="decoded tokens per timed repetition")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=LIBRARIES, help="measure only this library")
    parser.add_argument("--quick", action="store_true", help="one round, one repetition, 32 tokens (a smoke run)")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="seconds to wait before each run for other processes to idle"
    )
    parser.add_argument("--retries", type=int, default=2, help="retakes of a run that other processes slowed")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.reps, args.new = 1, 1, 32
        args.quiet_wait, args.retries = min(args.quiet_wait, 10.0), min(args.retries, 1)
    if not os.access(TIME, os.X_OK):
        parser.error(f"{TIME} (GNU time) is needed to read each child's peak RSS: apt-get install time")
    models = args.models.split(",")
    for m in models:
        if m not in files.MODELS:
            parser.error(f"unknown model {m!r}: choose from {', '.join(files.MODELS)}")
    types = args.types.split(",")
    for t in types:
        if t not in files.TYPES:
            parser.error(f"unknown type {t!r}: choose from {', '.join(files.TYPES)}")

    start = time.monotonic()
    burst, sustained = read_bandwidth(4.0 if args.quick else 12.0)
    header = (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads per library; read "
        f"bandwidth {sustained / 1e9:.1f} GB/s sustained ({burst / 1e9:.1f} GB/s burst); llama.cpp from "
        f"llama-cpp-python {files.LLAMA_CPP_VERSION} ({files.llama_cpp_dir()}); decode after {CONTEXT} tokens, "
        f"{args.new} new, prefill {PROMPT}; best of {args.repeats} rounds x {args.reps} repetitions"
    )
    print(header, flush=True)
    rows = []
    for model in models:
        for type_ in types:
            if type_ in files.types_for(model):
                rows.append(bench_file(model, type_, args))
    end_bandwidth = bandwidth_now(2.0)
    busy = [b for row in rows for name in LIBRARIES for b in row.get(name, {}).get("others", [])]
    builds = {row["llama.cpp"]["build"] for row in rows if "build" in row.get("llama.cpp", {})}
    print(
        f"read bandwidth at the end {end_bandwidth / 1e9:.1f} GB/s; llama.cpp build {', '.join(builds) or '-'}; "
        f"{time.monotonic() - start:.0f} s in all"
    )
    if busy and max(busy) > BUSY:
        print(
            f"warning: other processes used up to {max(busy):.0%} of the CPU during a run (the 'busy' column); "
            "llama.cpp's threads spin at their barriers and slow down many times when a core is taken"
        )
    print()
    print(table(rows))
    if args.json:
        report = {
            "header": header,
            "bandwidth": {"burst": burst, "sustained": sustained, "end": end_bandwidth},
            "args": vars(args),
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
