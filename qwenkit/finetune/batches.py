"""Conversations into training batches: token ids with assistant-only labels, packing, padding, and
which samples each process gets at each optimizer step.

A conversation is rendered with the checkpoint's chat template by `Tokenizer.encode_chat`; the
labels are the ids on assistant tokens, each turn's closing `<|im_end|>` included, and IGNORE_INDEX
elsewhere (padding too: pad is not eos, so the model still learns to stop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qwenkit.errors import DataError
from qwenkit.finetune.data import Conversation, DataStats
from qwenkit.model import IGNORE_INDEX
from qwenkit.tokenizer import Tokenizer


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where nothing is learned
    position_ids: list[int] | None = None  # set by packing

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(
    tok: Tokenizer, conversations: Sequence[Conversation], max_seq_len: int, stats: DataStats | None = None
) -> list[Sample]:
    """Ids and assistant-only labels for each conversation, truncated to max_seq_len.

    Args:
        tok: the tokenizer (its chat template renders the conversations).
        conversations: from `data.load_conversations`.
        max_seq_len: longer rows are cut (counted in stats.truncated); a row with no assistant
            token left is dropped (counted in stats.dropped_no_target).
        stats: a DataStats to count into.
    """
    stats = stats if stats is not None else DataStats()
    samples = []
    for c in conversations:
        try:
            ids, mask = tok.encode_chat(c.messages, tools=c.tools)
        except (ValueError, TypeError) as e:  # the template refused the conversation
            raise c.where.error(str(e)) from None
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        # The first label is never a target (nothing predicts it), so it cannot count as one.
        if not any(label != IGNORE_INDEX for label in labels[1:]):
            stats.dropped_no_target += 1
            continue
        samples.append(Sample(ids, labels))
    return samples


def pack(samples: Sequence[Sample], max_seq_len: int, seed: int = 0) -> list[Sample]:
    """Concatenate samples (in a seeded random order) into sequences of at most max_seq_len tokens.

    Positions restart at 0 at each sample, which tells the model to start a new attention block;
    no label crosses a boundary, since each sample's first token is a prompt token (IGNORE_INDEX).

    Args:
        samples: tokenized samples, each at most max_seq_len long.
        max_seq_len: the packed sequences' length limit.
        seed: the shuffle's seed.
    """
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    packs: list[Sample] = []
    current = Sample([], [], [])
    for i in order:
        s = samples[i]
        if current.input_ids and len(current) + len(s) > max_seq_len:
            packs.append(current)
            current = Sample([], [], [])
        current.input_ids += s.input_ids
        current.labels += [IGNORE_INDEX] + s.labels[1:]
        current.position_ids += list(range(len(s)))
    if current.input_ids:
        packs.append(current)
    return packs


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample of the batch (dynamic padding, on the right).

    Padding has attention_mask 0 and label IGNORE_INDEX, so the pad id (the eos-like
    `<|endoftext|>`) is never learned and `<|im_end|>` never masked.
    """
    T = max(len(s) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    packed = any(s.position_ids is not None for s in samples)
    position_ids = torch.zeros((B, T), dtype=torch.long) if packed else None  # (B, T)
    for b, s in enumerate(samples):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        attention_mask[b, :n] = 1
        if packed:
            position_ids[b, :n] = torch.tensor(s.position_ids if s.position_ids is not None else range(n))
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch


class StepBatches:
    """Which samples each process gets at each optimizer step: a pure function of the step.

    Each epoch is a seeded permutation of the samples; a step takes the next global batch of
    batch_size x grad_accum x world_size samples (an epoch's remainder is dropped), and process `rank`
    gets rows [rank * batch_size, (rank + 1) * batch_size) of each accumulation slice. So the
    data position is the step count alone, which makes resuming exact, and the same global batch
    splits the same way across any number of processes.

    Args:
        samples: the training samples (packed or not).
        batch_size: sequences per micro-batch per process.
        grad_accum: micro-batches per step.
        world_size, rank: the process group.
        seed: the data order's seed.
        pad_id: the padding id.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        pad_id: int,
    ):
        self.samples, self.batch_size, self.grad_accum = samples, batch_size, grad_accum
        self.world_size, self.rank, self.seed, self.pad_id = world_size, rank, seed, pad_id
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = len(samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(samples)} training sequences do not fill one step of batch_size x grad_accum "
                f"x processes = {self.global_batch}: lower batch_size or grad_accum"
            )
        self._epoch, self._order = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of optimizer step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.samples), generator=g).tolist()
        return self._order

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's grad_accum micro-batches for optimizer step `step`."""
        epoch, index = self.position(step)
        order = self.order(epoch)
        start = index * self.global_batch
        out = []
        for m in range(self.grad_accum):
            lo = start + (m * self.world_size + self.rank) * self.batch_size
            out.append(collate([self.samples[i] for i in order[lo : lo + self.batch_size]], self.pad_id))
        return out


def eval_batches(
    samples: Sequence[Sample], batch_size: int, world_size: int, rank: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's share of the validation samples, in batches; every sample counts once overall.

    Every process gets the same number of batches (FSDP needs each forward on all of them): a
    process with fewer samples fills in with a copy whose labels are all IGNORE_INDEX, which adds
    nothing.
    """
    mine = list(samples[rank::world_size])
    per_rank = -(-len(samples) // world_size)
    filler = Sample(samples[0].input_ids, [IGNORE_INDEX] * len(samples[0]))
    mine += [filler] * (per_rank - len(mine))
    for i in range(0, len(mine), batch_size):
        yield collate(mine[i : i + batch_size], pad_id)


__all__ = ["Sample", "StepBatches", "collate", "eval_batches", "pack", "tokenize"]
