"""The training loss: a chunked, fused LM head + cross-entropy over the 152k vocabulary.

`model(ids, labels=...)` materializes fp32 logits for every position, (B, T, 152064) floats, then
their softmax and its gradient, each as large again: gigabytes for a batch of 4 x 512, and most of a
training step's memory traffic. Here only the positions that have a target (in supervised
fine-tuning, the assistant tokens) get logits at all, a chunk of rows at a time; each chunk's
gradients with respect to the hidden states and the head weight are computed right away, in the
forward pass, so nothing of (rows, vocab) size is kept for backward or recomputed. This is the
"fused linear cross-entropy" of Liger-Kernel, in plain PyTorch. Where the head is frozen (LoRA,
evaluation), a chunk goes through the vocabulary a tile at a time with an online softmax, so its
logits stay in the CPU's caches.

The loss is returned as a sum over target tokens; the trainer divides by the number of targets in
the whole (accumulated, all-rank) batch, so that every token weighs the same however the batch is
split across micro-batches and processes.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenkit.model import IGNORE_INDEX, shift_labels

# Rows of logits per chunk where the head trains: 512 x 152k fp32 is ~311 MB, small next to a 7B
# model's activations, and large enough that each chunk is one efficient matrix product.
DEFAULT_CHUNK_ROWS = 512
# Where the head is frozen, tiles of rows x columns: 2048 rows (every position of a 4 x 512 batch in
# one pass over the weight) and about 2M logits (8 MB in fp32, inside the CPU's last-level cache).
FROZEN_CHUNK_ROWS = 2048
TILE_ELEMENTS = 2**21


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h,
        weight,
        targets,
        label_smoothing: float,
        chunk_rows: int | None,
        vocab_tile: int | None,
        need_h: bool,
        need_w: bool,
    ):
        # h (N, C); weight (V, C); targets (N,), all valid (no ignore index)
        if need_w:
            loss, grad_h, grad_w = _trained_head(h, weight, targets, label_smoothing, chunk_rows, need_h)
        else:
            loss, grad_h = _frozen_head(h, weight, targets, label_smoothing, chunk_rows, vocab_tile, need_h)
            grad_w = None
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.need = (need_h, need_w)
        ctx.used = False
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            # The gradients were scaled in place the first time (no second V x C buffer).
            raise RuntimeError("fused_linear_cross_entropy: backward through the same graph twice is not supported")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.need
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if need_h else None
        gw = grad_w.mul_(grad_out).to(ctx.dtypes[1]) if need_w else None
        return gh, gw, None, None, None, None, None, None


def _accumulator(h: torch.Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 when the inputs are


def _logits(hc: torch.Tensor, w: torch.Tensor, buf: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """(n, t) logits hc @ w.T in the accumulator's dtype: written into `buf` (a reused buffer, where
    the inputs are already in that dtype), else computed in the inputs' dtype and converted."""
    if buf is not None:
        return torch.mm(hc, w.t(), out=buf[: hc.shape[0], : w.shape[0]])
    return (hc @ w.t()).to(acc)


def _trained_head(h, weight, targets, eps: float, chunk_rows: int | None, need_h: bool):
    """Loss, d loss / d h and d loss / d weight, a chunk of rows at a time over the whole vocabulary:
    the weight's gradient needs each row's normalized softmax, so a chunk's logits are built whole."""
    N, V = h.shape[0], weight.shape[0]
    acc = _accumulator(h)
    chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None  # (N, C)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)  # (V, C)
    # One logits buffer for every chunk where the product is already in fp32: a fresh block of
    # this size would come from mmap and pay its page faults on every chunk.
    buf = torch.empty(min(chunk_rows, N), V, dtype=acc, device=h.device) if h.dtype == weight.dtype == acc else None
    for start in range(0, N, chunk_rows):
        hc, tc = h[start : start + chunk_rows], targets[start : start + chunk_rows]  # (n, C), (n,)
        logits = _logits(hc, weight, buf, acc)  # (n, V)
        # The softmax is built in place in `logits`: every pass over (n, V) costs as much as a
        # small matrix product on a CPU, so there are five, where log_softmax and its backward take ten.
        top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        target_logit = logits.gather(1, tc[:, None]).squeeze(1)  # (n,)
        mean_logit = logits.mean(-1) if eps else None  # (n,)
        probs = logits.sub_(top).exp_()  # (n, V), unnormalized
        total = probs.sum(-1)  # (n,)
        lse = top.squeeze(1) + total.log()  # (n,)
        loss += _token_losses(lse, target_logit, mean_logit, eps).sum()
        # d loss / d logits = softmax - (1 - eps) * onehot - eps / V
        grad = probs.div_(total[:, None])  # (n, V)
        if eps:
            grad.sub_(eps / V)
        grad.scatter_add_(1, tc[:, None], torch.full_like(tc[:, None], -(1 - eps), dtype=grad.dtype))
        grad = grad.to(h.dtype)
        if need_h:
            grad_h[start : start + chunk_rows] = grad @ weight  # (n, C)
        if hc.dtype == grad_w.dtype:
            grad_w.addmm_(grad.t(), hc)  # (V, C)
        else:
            grad_w += grad.t() @ hc  # (V, C) bf16 product, accumulated in fp32
    return loss, grad_h, grad_w


def _frozen_head(h, weight, targets, eps: float, chunk_rows: int | None, vocab_tile: int | None, need_h: bool):
    """Loss and d loss / d h with the head frozen (LoRA, evaluation), a tile of the vocabulary at a time.

    Without the weight's gradient nothing needs a row's whole softmax at once: each tile of logits
    is exponentiated against the running maximum of its rows and multiplied into the gradient
    right away, and what came before is rescaled when the maximum grows (the online softmax of
    flash attention). d loss / d h = softmax @ W - (1 - eps) W[target] - (eps / V) sum_v W[v].
    A tile of 2048 x 1024 fp32 logits is 8 MB and stays in the CPU's caches, where whole-vocabulary
    chunks would send every pass over the logits to memory.
    """
    N, V = h.shape[0], weight.shape[0]
    acc = _accumulator(h)
    rows = min(chunk_rows or FROZEN_CHUNK_ROWS, N)
    tile = min(vocab_tile or max(256, TILE_ELEMENTS // rows), V)
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None  # (N, C)
    in_acc = h.dtype == weight.dtype == acc  # the products can write fp32 tiles directly
    buf = torch.empty(rows, tile, dtype=acc, device=h.device) if in_acc else None  # one tile, reused
    column_sum = weight.sum(0, dtype=acc) if eps and need_h else None  # (C,): sum_v W[v]
    for start in range(0, N, rows):
        hc, tc = h[start : start + rows], targets[start : start + rows]  # (n, C), (n,)
        n = hc.shape[0]
        top = torch.full((n,), float("-inf"), dtype=acc, device=h.device)  # running row maximum
        total = torch.zeros(n, dtype=acc, device=h.device)  # sum of exp(logit - top)
        logit_sum = torch.zeros(n, dtype=acc, device=h.device) if eps else None
        grad = torch.zeros(n, h.shape[1], dtype=acc, device=h.device) if need_h else None  # (n, C), times total
        for v0 in range(0, V, tile):
            w = weight[v0 : v0 + tile]  # (t, C)
            logits = _logits(hc, w, buf, acc)  # (n, t)
            if eps:
                logit_sum += logits.sum(-1)
            new_top = torch.maximum(top, logits.amax(-1))  # (n,)
            rescale = (top - new_top).exp_()  # (n,); 0 at the first tile
            probs = logits.sub_(new_top[:, None]).exp_()  # (n, t), unnormalized
            total.mul_(rescale).add_(probs.sum(-1))
            if need_h:
                grad.mul_(rescale[:, None])
                if in_acc:
                    grad.addmm_(probs, w)
                else:
                    grad += (probs.to(h.dtype) @ w).to(acc)
            top = new_top
        lse = top + total.log()  # (n,)
        target_rows = weight[tc].to(acc)  # (n, C)
        target_logit = (hc.to(acc) * target_rows).sum(-1)  # (n,)
        mean_logit = logit_sum / V if eps else None
        loss += _token_losses(lse, target_logit, mean_logit, eps).sum()
        if need_h:
            grad.div_(total[:, None]).sub_(target_rows, alpha=1 - eps)
            if eps:
                grad.sub_(column_sum, alpha=eps / V)
            grad_h[start : start + rows] = grad
    return loss, grad_h


def _token_losses(lse, target_logit, mean_logit, eps: float):
    """-log p(target), with PyTorch's label smoothing: (1 - eps) * nll + eps * mean over the vocabulary of -log p."""
    losses = lse - target_logit
    return (1 - eps) * losses + eps * (lse - mean_logit) if eps else losses


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    chunk_rows: int | None = None,
    vocab_tile: int | None = None,
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), never holding (rows, vocab) for backward.

    Args:
        hidden: (N, C) final hidden states of the positions that have a target.
        weight: (V, C) the LM head.
        targets: (N,) target ids (no ignore index left).
        label_smoothing: as in torch.nn.functional.cross_entropy.
        chunk_rows: rows of logits computed at a time (default: 512 where the head trains, 2048
            where it is frozen).
        vocab_tile: where the head is frozen, columns of logits computed at a time (default: about
            two million logits a tile).
    """
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    if not (need_h or need_w):
        with torch.no_grad():
            return _frozen_head(hidden, weight, targets, label_smoothing, chunk_rows, vocab_tile, False)[0]
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, targets, label_smoothing, chunk_rows, vocab_tile, need_h, need_w
    )


class CausalLMLoss(nn.Module):
    """The model plus the loss, as one module: the unit that FSDP shards at its root and that the
    trainer calls. Returns (sum of token losses, number of target tokens).

    Args:
        model: a QwenForCausalLM (possibly with LoRA layers).
        label_smoothing: label smoothing of the cross-entropy.
        chunk_rows: rows of logits per chunk (None: fused_linear_cross_entropy's default).
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, chunk_rows: int | None = None):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.chunk_rows = chunk_rows

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, C)
        targets = shift_labels(labels)  # (B, T)
        keep = targets != IGNORE_INDEX  # (B, T)
        h, weight = h[keep], self.model.output_weight()  # (N, C), (V, C)
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            # The fused function runs outside autocast, so cast here, where autograd sees the casts.
            dtype = torch.get_autocast_dtype(device_type)
            h, weight = h.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            loss = fused_linear_cross_entropy(h, weight, targets[keep], self.label_smoothing, self.chunk_rows)
        return loss, keep.sum()
