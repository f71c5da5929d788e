"""The `quantize` command: a checkpoint folder written as a quantized GGUF file (llama.cpp's format).

The work is qwenkit.gguf_export's, imported inside the function so that `qwenkit --help` stays fast.
"""

from __future__ import annotations

from typing import Literal

# --type's choices, by llama.cpp's names.
QuantType = Literal["q8_0", "q4_0"]


def quantize(*, model: str, type_: QuantType = "q8_0", out: str, overwrite: bool = False) -> None:
    """Write a checkpoint folder as a quantized GGUF file, which llama.cpp and qwenkit both load.

    The types, in bits per weight of the 2-D weights (blocks of 32 weights sharing one fp16 scale;
    norms and biases stay 32-bit floats):
      q8_0  8.5 bits: about half the size of bf16, close to lossless (SmolLM2-135M: perplexity
            +0.4%, the same most likely next token 97% of the time). The one to use when it fits.
      q4_0  4.5 bits: about a quarter of bf16, and faster to decode where memory bandwidth bounds
            the speed, at a visible cost in quality that small models feel most (SmolLM2-135M:
            perplexity +19%, the same next token 66% of the time). The output head stays q8_0
            (llama.cpp's own q4_0 gives it 6.6-bit Q6_K where its rows allow, else q8_0).

    Qwen2/Qwen2.5 and Llama-architecture (SmolLM2, ...) folders. The file carries the tokenizer,
    the chat template and the generation defaults: llama.cpp runs it (llama-cli -m X.gguf,
    llama-server, ...), `qwenkit.load_model("X.gguf")` loads it, and `qwenkit convert gguf X.gguf
    --out DIR` turns it back into a checkpoint folder. The file is written under a temporary name
    and renamed into place, so an interrupted run leaves nothing behind.

    Args:
        model: a checkpoint folder, a hub id, or "default" (the 135M stand-in model; see `qwenkit models`).
        type_: q8_0 or q4_0 (see above).
        out: the .gguf file to write.
        overwrite: replace --out if it exists.
    """
    from qwenkit.gguf_export import write_gguf
    from qwenkit.hub import resolve_model

    path = write_gguf(resolve_model(model), out, qtype=type_, overwrite=overwrite, progress=True)
    print(f"wrote {path} ({type_}, {path.stat().st_size / 1e6:.1f} MB)")


COMMANDS = {"quantize": quantize}
