"""The training loss: a chunked, fused LM head + cross-entropy over the 152k vocabulary.

`model(ids, labels=...)` materializes fp32 logits for every position, (B, T, 152064) floats, then
their softmax and its gradient, each as large again: gigabytes for a batch of 4 x 512, and most of a
training step's memory traffic. Here only the positions that have a target (in supervised
fine-tuning, the assistant tokens) get logits at all, a chunk of rows at a time; each chunk's
gradients with respect to the hidden states and the head weight are computed right away, in the
forward pass, so nothing of (rows, vocab) size is kept for backward or recomputed. This is the
"fused linear cross-entropy" of Liger-Kernel, in plain PyTorch.

The loss is returned as a sum over target tokens; the trainer divides by the number of targets in
the whole (accumulated, all-rank) batch, so that every token weighs the same however the batch is
split across micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# Rows of logits per chunk: 512 x 152k fp32 is ~311 MB, small next to a 7B model's activations,
# and large enough that each chunk is one efficient matrix product.
DEFAULT_CHUNK_ROWS = 512


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, label_smoothing: float, chunk_rows: int, need_h: bool, need_w: bool):
        # h (N, C); weight (V, C); targets (N,), all valid (no ignore index)
        N, V = h.shape[0], weight.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 when the inputs are
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None  # (N, C)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # (V, C)
        eps = label_smoothing
        # One logits buffer for every chunk where the product is already in fp32: a fresh block of
        # this size comes from mmap and costs its page faults each time (~15% of the product on CPU).
        buf = torch.empty(min(chunk_rows, N), V, dtype=acc, device=h.device) if h.dtype == weight.dtype == acc else None
        for start in range(0, N, chunk_rows):
            hc, tc = h[start:start + chunk_rows], targets[start:start + chunk_rows]  # (n, C), (n,)
            if buf is not None:
                logits = torch.mm(hc, weight.t(), out=buf[:hc.shape[0]])  # (n, V)
            else:
                logits = (hc @ weight.t()).to(acc)  # (n, V)
            # The softmax is built in place in `logits`: every pass over (n, V) costs as much as a
            # small matrix product on a CPU, so there are five, where log_softmax and its backward take ten.
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            target_logit = logits.gather(1, tc[:, None]).squeeze(1)  # (n,)
            mean_logit = logits.mean(-1) if eps else None  # (n,)
            probs = logits.sub_(top).exp_()  # (n, V), unnormalized
            total = probs.sum(-1)  # (n,)
            lse = top.squeeze(1) + total.log()  # (n,)
            chunk_loss = lse - target_logit
            if eps:
                # PyTorch's label smoothing: (1 - eps) * nll + eps * mean over the vocabulary of -log p.
                chunk_loss = (1 - eps) * chunk_loss + eps * (lse - mean_logit)
            loss += chunk_loss.sum()
            if not (need_h or need_w):
                continue
            # d loss / d logits = softmax - (1 - eps) * onehot - eps / V
            grad = probs.div_(total[:, None])  # (n, V)
            if eps:
                grad.sub_(eps / V)
            grad.scatter_add_(1, tc[:, None], torch.full_like(tc[:, None], -(1 - eps), dtype=grad.dtype))
            grad = grad.to(h.dtype)
            if need_h:
                grad_h[start:start + chunk_rows] = grad @ weight  # (n, C)
            if need_w and hc.dtype == grad_w.dtype:
                grad_w.addmm_(grad.t(), hc)  # (V, C)
            elif need_w:
                grad_w += grad.t() @ hc  # (V, C) bf16 product, accumulated in fp32
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
        return gh, gw, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               label_smoothing: float = 0.0, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), never holding (rows, vocab) for backward.

    Args:
        hidden: (N, C) final hidden states of the positions that have a target.
        weight: (V, C) the LM head.
        targets: (N,) target ids (no ignore index left).
        label_smoothing: as in torch.nn.functional.cross_entropy.
        chunk_rows: rows of logits computed at a time.
    """
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    if not (need_h or need_w):
        with torch.no_grad():
            return _FusedLinearCrossEntropy.forward(_NoCtx(), hidden, weight, targets, label_smoothing, chunk_rows,
                                                    False, False)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, label_smoothing, chunk_rows, need_h, need_w)


class _NoCtx:
    """Stands in for autograd's ctx when no gradient is wanted (evaluation)."""

    def save_for_backward(self, *tensors):
        pass


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with the inputs -> (B, T) targets: position t predicts token t + 1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class CausalLMLoss(nn.Module):
    """The model plus the loss, as one module: the unit that FSDP shards at its root and that the
    trainer calls. Returns (sum of token losses, number of target tokens).

    Args:
        model: a QwenForCausalLM (possibly with LoRA layers).
        label_smoothing: label smoothing of the cross-entropy.
        chunk_rows: rows of logits per chunk.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.chunk_rows = chunk_rows

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, C)
        targets = shift_targets(labels)  # (B, T)
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
