"""Users' embeddings from a trained encoder, in batches, in eval mode.

The intent embedding of a user is the mean over all T positions of the encoder's output for its
training input (spec: "Losses", item 2), the same vector the cluster loss, the k-means start,
the centre statistics and the diagnostics use: they all come through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from elcrec_dist.data import left_pad, train_pairs
from elcrec_dist.model import ELCRec


@torch.no_grad()
def pooled_embeddings(
    model: ELCRec, sequences: Sequence[np.ndarray], *, batch_size: int
) -> torch.Tensor:
    """Mean-pooled embeddings of the users' training inputs (``seq[:-3]``), eval mode, in
    batches of ``batch_size`` users: -> [U, D] float32 on the CPU, not normalised. The model's
    train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = model.item_embeddings.weight.device
    out = [torch.zeros(0, model.config.hidden_size)]
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = [train_pairs(seq)[0] for seq in sequences[start : start + batch_size]]
            hidden = model(left_pad(chunk, model.config.max_len).to(device))  # [b, T, D]
            out.append(model.pooled(hidden).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
