"""From encoded examples to the batches a stage trains on: packing, padding and collating, and the
resumable, shardable order in which they are read.

    pack_documents / pack_examples   token lists -> block_size rows (pt, sft packing), no attention across
                                     documents (document_ids) and positions restarting per document
    collate_*                        examples -> padded tensors [B, T]; labels padded with IGNORE_INDEX
    ResumableSampler                 shuffled example indices per epoch, resumable from (epoch, position)
    StratifiedSampler                the same, every batch holding each class in its share (kto)
    BatchIterator                    collated batches in a sampler's order; its state_dict is the data
                                     position a checkpoint keeps; `shard` gives each rank its share
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from minirlhf.losses import IGNORE_INDEX

# ----------------------------------------------------------------------------- packing

def pack_documents(docs: Sequence[Sequence[int]], block_size: int) -> list[dict[str, list[int]]]:
    """pt: concatenate documents (each ending in EOS) and cut into blocks of `block_size` tokens.

    A document cut at a block boundary continues in the next block as a new segment. Each block carries
    document_ids [T] (0, 1, ... per segment), position_ids [T] restarting at 0 per segment, and labels
    with -100 on each segment's first token, so no token is predicted from another document's tokens.
    A final partial block is kept when it has at least 2 tokens.
    """
    blocks: list[dict[str, list[int]]] = []
    cur = _empty_block()
    for doc in docs:
        offset = 0
        while offset < len(doc):
            piece = list(doc[offset: offset + block_size - len(cur["input_ids"])])
            _append_segment(cur, piece, piece)
            offset += len(piece)
            if len(cur["input_ids"]) == block_size:
                blocks.append(cur)
                cur = _empty_block()
    if len(cur["input_ids"]) >= 2:
        blocks.append(cur)
    return blocks


def pack_examples(examples: Sequence[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """sft packing: put whole examples, in order, into blocks of at most `block_size` tokens.

    A block is closed when the next example does not fit; examples longer than block_size are cut to
    block_size. Same document_ids / position_ids / first-label rules as `pack_documents`.
    """
    blocks: list[dict[str, list[int]]] = []
    cur = _empty_block()
    for ex in examples:
        ids, labels = ex["input_ids"][:block_size], ex["labels"][:block_size]
        if len(cur["input_ids"]) + len(ids) > block_size:
            blocks.append(cur)
            cur = _empty_block()
        _append_segment(cur, ids, labels)
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def _empty_block() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "document_ids": [], "position_ids": []}


def _append_segment(block: dict[str, list[int]], ids: Sequence[int], labels: Sequence[int]) -> None:
    doc = block["document_ids"][-1] + 1 if block["document_ids"] else 0
    block["input_ids"] += ids
    block["labels"] += [IGNORE_INDEX] + list(labels[1:])
    block["document_ids"] += [doc] * len(ids)
    block["position_ids"] += list(range(len(ids)))


# ----------------------------------------------------------------------------- collators

def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """[B, T_max] long tensor, padded with `value` on the right (or left)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            out[i, cols] = torch.tensor(r, dtype=torch.long)
    return out


def _mask(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left)


def collate_sft(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """pt/sft batch, right-padded: input_ids, attention_mask, labels [B, T] (and document_ids,
    position_ids [B, T] for packed examples; padding is its own document at position 0)."""
    ids = [e["input_ids"] for e in examples]
    batch = {"input_ids": _pad(ids, pad_id), "attention_mask": _mask(ids),
             "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX)}
    if "document_ids" in examples[0]:
        width = batch["input_ids"].shape[1]
        batch["document_ids"] = torch.tensor(
            [e["document_ids"] + [e["document_ids"][-1] + 1] * (width - len(e["document_ids"])) for e in examples])
        batch["position_ids"] = _pad([e["position_ids"] for e in examples], 0)
    return batch


def collate_preference(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """rm/dpo batch: chosen_{input_ids, attention_mask, labels} and rejected_{...}, all [B, T] with one
    common T (so the two halves can run as one [2B, T] forward), prompt_lens [B] and margin [B] if any."""
    sides = {s: [e[f"{s}_input_ids"] for e in examples] for s in ("chosen", "rejected")}
    width = max(len(r) for rows in sides.values() for r in rows)
    batch = {}
    for s, rows in sides.items():
        labels = [e[f"{s}_labels"] for e in examples]
        batch[f"{s}_input_ids"] = pad_to(_pad(rows, pad_id), width, pad_id)
        batch[f"{s}_attention_mask"] = pad_to(_mask(rows), width, 0)
        batch[f"{s}_labels"] = pad_to(_pad(labels, IGNORE_INDEX), width, IGNORE_INDEX)
    batch["prompt_lens"] = torch.tensor([e["prompt_len"] for e in examples])
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """x [B, T] right-padded with `value` to [B, width]."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def collate_kto(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """kto batch: input_ids, attention_mask, labels [B, T], desirable [B] bool, prompt_lens [B], and the
    mismatched pairs for the KL reference point (Ethayarajh et al. 2024, sec. 4.1): kl_input_ids,
    kl_attention_mask, kl_labels [B, T'] pairing prompt i with the completion of example (i + 1) % B."""
    batch = collate_sft(examples, pad_id)
    batch["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
    batch["prompt_lens"] = torch.tensor([e["prompt_len"] for e in examples])
    kl_ids, kl_labels = [], []
    for i, e in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        p, q = e["prompt_len"], other["prompt_len"]
        kl_ids.append(e["input_ids"][:p] + other["input_ids"][q:])
        kl_labels.append([IGNORE_INDEX] * p + other["labels"][q:])
    batch["kl_input_ids"] = _pad(kl_ids, pad_id)
    batch["kl_attention_mask"] = _mask(kl_ids)
    batch["kl_labels"] = _pad(kl_labels, IGNORE_INDEX)
    return batch


def collate_prompts(examples: Sequence[dict], pad_id: int) -> dict[str, Any]:
    """ppo/grpo prompt batch, LEFT-padded for generation: input_ids, attention_mask [B, T]; and, for examples
    of data.encode_prompt, `prompts` (B prompts as their rows give them) and `fields` (column -> B values,
    plain Python lists, for the columns every example has)."""
    ids = [e["input_ids"] for e in examples]
    batch: dict[str, Any] = {"input_ids": _pad(ids, pad_id, left=True), "attention_mask": _mask(ids, left=True)}
    if all("fields" in e for e in examples):
        batch["prompts"] = [e["prompt"] for e in examples]
        common = [k for k in examples[0]["fields"] if all(k in e["fields"] for e in examples)]
        batch["fields"] = {k: [e["fields"][k] for e in examples] for k in common}
    return batch


# ----------------------------------------------------------------------------- resumable iteration

class ResumableSampler:
    """Batches of example indices, reshuffled every epoch, resumable from (epoch, position).

    The order of epoch e is torch.randperm(n) under seed + e, so the state is two integers: the epoch
    and how many examples of it were already handed out. Iteration never ends; `epoch` tells the
    caller when a pass is over.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"ResumableSampler needs num_examples >= 1 and batch_size >= 1, got "
                             f"{num_examples} and {batch_size}")
        if drop_last and num_examples < batch_size:
            raise ValueError(f"ResumableSampler: drop_last with {num_examples} examples < batch_size "
                             f"{batch_size} gives no batches")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        return torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> ResumableSampler:
        return self

    def __next__(self) -> list[int]:
        left = self.num_examples - self.position
        if left == 0 or (self.drop_last and left < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.position: self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_examples"] != self.num_examples or state["seed"] != self.seed:
            raise ValueError(f"ResumableSampler state is for {state['num_examples']} examples with seed "
                             f"{state['seed']}, this dataset has {self.num_examples} with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)


class StratifiedSampler(ResumableSampler):
    """A ResumableSampler whose every batch holds each class in its share of the whole data (+-1 example).

    The epoch's permutation (seed + epoch, as above) sets the order within each class; the classes are then
    merged by relative position, the k-th of the n members of a class going to (k + 0.5) / n, so members of
    every class are spread evenly over the epoch. strata: [N] the class of each example (any hashable).
    """

    def __init__(self, strata: Sequence[Any], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        self.strata = list(strata)
        self.sizes: dict[Any, int] = {}
        for c in self.strata:
            self.sizes[c] = self.sizes.get(c, 0) + 1
        super().__init__(len(self.strata), batch_size, seed, shuffle, drop_last)

    def _epoch_order(self, epoch: int) -> list[int]:
        seen: dict[Any, int] = {}
        keyed = []
        for i in super()._epoch_order(epoch):
            c = self.strata[i]
            seen[c] = seen.get(c, 0) + 1
            keyed.append(((seen[c] - 0.5) / self.sizes[c], i))
        return [i for _, i in sorted(keyed)]


class BatchIterator:
    """Collated batches of `examples` in the order of a ResumableSampler (a StratifiedSampler when `strata`
    gives each example's class); checkpoint its state_dict."""

    def __init__(self, examples: Sequence[dict], batch_size: int, collate: Callable[[Sequence[dict]], Any],
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, strata: Sequence[Any] | None = None):
        self.examples, self.collate = examples, collate
        if strata is None:
            self.sampler = ResumableSampler(len(examples), batch_size, seed, shuffle, drop_last)
        else:
            self.sampler = StratifiedSampler(strata, batch_size, seed, shuffle, drop_last)
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Read only rank's share: of each world_size consecutive batches of the single-process order,
        the rank-th. Every rank advances the sampler alike, so its state stays the global position."""
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchIterator.shard: rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank reads per pass over the data."""
        return math.ceil(self.sampler.batches_per_epoch / self.world_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        batches = [next(self.sampler) for _ in range(self.world_size)]
        return self.collate([self.examples[i] for i in batches[self.rank]])

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
