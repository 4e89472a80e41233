"""Padding-free batches for an encoder: several sequences share one row, each attending only to itself.

A batch of B sequences padded to the longest one computes B·max(n) token positions; packing them
into rows of ``width`` positions (first-fit decreasing) computes about Σn. Inside a row, sequence s
occupies a contiguous span, its positions restart at 0 and a block-diagonal mask keeps its tokens
from attending outside the span, so every sequence's hidden states are those of its own unpadded
forward (to float round-off). Unused positions at the end of a row attend only to themselves (no
row of the mask is empty, so no softmax over nothing) and are never pooled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows of sequence indices whose lengths sum to at most ``width``, longest sequences placed first."""
    if any(n > width for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {width}")
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[index] <= room:
                rows[r].append(index)
                free[r] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(width - lengths[index])
    return rows


@dataclass(frozen=True)
class Packed:
    """Packed encoder inputs and where each sequence's tokens went."""

    inputs: dict[str, torch.Tensor]  # input_ids, token_type_ids, position_ids (R × W); attention_mask (R × 1 × W × W)
    segment: torch.Tensor  # (R·W,) index of the sequence each position holds; -1 for unused positions
    lengths: torch.Tensor  # (S,) tokens of each sequence


def pack(sequences: Sequence[Mapping[str, torch.Tensor]], width: int, pad_id: int = 0) -> Packed:
    """Pack 1-D token tensors (``input_ids`` and optionally ``token_type_ids`` per sequence) into rows."""
    lengths = [len(s["input_ids"]) for s in sequences]
    rows = first_fit_decreasing(lengths, width)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    types = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for s in members:
            n = lengths[s]
            ids[r, start : start + n] = sequences[s]["input_ids"]
            if "token_type_ids" in sequences[s]:
                types[r, start : start + n] = sequences[s]["token_type_ids"]
            positions[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = s
            start += n
    # tokens attend within their own sequence; an unused position only to itself
    own = torch.where(segment >= 0, segment, -2 - torch.arange(width).expand(shape))
    mask = (own.unsqueeze(2) == own.unsqueeze(1)).unsqueeze(1)
    inputs = {"input_ids": ids, "token_type_ids": types, "position_ids": positions, "attention_mask": mask}
    return Packed(inputs, segment.reshape(-1), torch.tensor(lengths))


def mean_pool(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(S × d) mean of each sequence's hidden states, from the packed (R × W × d) output."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    used = packed.segment >= 0
    sums = torch.zeros(len(packed.lengths), flat.shape[-1], dtype=flat.dtype, device=flat.device)
    sums = sums.index_add(0, packed.segment[used].to(flat.device), flat[used])
    return sums / packed.lengths.to(flat.device, flat.dtype).clamp(min=1).unsqueeze(1)
