"""Reading a GGUF file's header: qwenkit.gguf_file against the gguf package's GGUFReader.

    python benchmarks/bench_gguf_read.py [FILE.gguf ...]

For each file (default: bench_quant's files that are there, ~/.cache/qwenkit/bench-quant/gguf),
alternating the two readers, each in a fresh process: the seconds to read the metadata (every
value, as GGUFReader's `contents()` gives them) and the tensor table, and the process's peak RSS
over its RSS after the imports. Prints one row per file and the ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import gguf
from qwenkit.gguf_file import GGUFFile
def rss(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
base = rss("VmRSS")
t = time.perf_counter()
if sys.argv[2] == "qwenkit":
    f = GGUFFile(sys.argv[1]); meta, n = f.metadata, len(f.tensors)
else:
    r = gguf.GGUFReader(sys.argv[1]); meta, n = {k: v.contents() for k, v in r.fields.items()}, len(r.tensors)
print(json.dumps({"s": time.perf_counter() - t, "mb": rss("VmHWM") - base}))
"""


def run(path: Path, reader: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), reader], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    files = [Path(p) for p in sys.argv[1:]] or sorted(
        (Path.home() / ".cache/qwenkit/bench-quant/gguf").glob("*-Q4_K_M.gguf")
    )
    if not files:
        sys.exit("no GGUF files: pass some, or run benchmarks/bench_quant.py once to make its files")
    print("| file | MB | read s gguf / qwenkit | ratio | peak RSS over imports MB gguf / qwenkit |")
    print("| --- | --- | --- | --- | --- |")
    for path in files:
        best = {}
        for _ in range(2):  # alternating, best of two
            for reader in ("gguf", "qwenkit"):
                r = run(path, reader)
                old = best.get(reader)
                best[reader] = r if old is None or r["s"] < old["s"] else old
        g, q = best["gguf"], best["qwenkit"]
        print(f"| {path.name} | {path.stat().st_size / 1e6:.0f} | {g['s']:.2f} / {q['s']:.2f} | "
              f"{g['s'] / q['s']:.0f}x | {g['mb']:.0f} / {q['mb']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
