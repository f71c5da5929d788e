"""The static key/value cache of generation.

Preallocated once per generation (or per server), one row per sequence: row b's tokens occupy its
slots 0..lengths[b]-1, and `valid` marks the slots that hold real tokens (left padding does not).
A row's rotary positions count only its valid slots, so left padding never shifts them.
Shapes: B rows, S slots, T new tokens, K kv heads, D head dim.
"""

from __future__ import annotations

import torch

from qwenkit.config import QwenConfig


class KVCache:
    """Every layer's keys and values, (B, K, S, D) each, with a fill length per row.

    Rows move on their own: a row can be reset and refilled (through `rows`) while the others
    decode, and a step whose mask is all zeros for a row leaves that row where it was.
    """

    def __init__(
        self,
        config: QwenConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.dim_per_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start:stop that shares this one's storage (views, no copy)."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.valid, view.lengths, view.max_len = self.valid[start:stop], self.lengths[start:stop], self.max_len
        return view

    def reset(self) -> None:
        self.valid.zero_()
        self.lengths.zero_()

    def extend(self, T: int, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the next T slots of every row for new tokens, and return (slots, positions), (B, T) each.

        `real` (B, T) marks the real tokens among them (None: all are real); they become valid, and
        a row's length advances by T where it has at least one. A new token's rotary position is the
        count of real tokens before it in its row.
        """
        end = int(self.lengths.max()) + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens per row; {end} do not fit")
        slots = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        before = self.valid.sum(-1, keepdim=True)  # (B, 1): real tokens already cached
        if real is None:
            self.valid.scatter_(1, slots, True)
            positions = before + torch.arange(T, device=before.device)
            self.lengths += T
        else:
            self.valid.scatter_(1, slots, real)
            positions = (before + real.long().cumsum(-1) - 1).clamp(min=0)
            self.lengths += T * real.any(-1)
        return slots, positions
