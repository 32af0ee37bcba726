"""One forward pass over ``<bos> prompt continuation`` rows: the teacher-forced scorers' shared core."""

from __future__ import annotations

import numpy as np
import torch


def teacher_forced_rows(prompts: list[list[int]], continuations: list[list[int]],
                        pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + continuation`` ids and the mask of continuation positions.

    Right padding with a causal model needs no attention mask: pads only follow the tokens scored.
    """
    rows = [p + c for p, c in zip(prompts, continuations)]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = row
        mask[i, len(prompt) : len(row)] = True
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def forward_targets(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each position, the targets there, and which targets count."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return logits, ids[:, 1:], mask[:, 1:]
