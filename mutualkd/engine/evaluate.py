"""Evaluation: per-peer top-1/top-5 and the mean-logit ensemble's top-1, exact under N processes.

Data-parallel ranks evaluate disjoint shards and sum their counts; peer-parallel ranks evaluate every sample
with their own peers and exchange logits for the ensemble.
"""

from __future__ import annotations

import torch

from mutualkd.data import BatchAugment, eval_indices, make_eval_loader
from mutualkd.placement import Placement


@torch.inference_mode()
def evaluate(group, dataset, augment: BatchAugment, accelerator, placement: Placement, batch_size: int,
             num_peers: int, num_workers: int = 0) -> dict:
    """Accuracy in % on `dataset`; every sample counted once (ranks take disjoint shards)."""
    was_training = group.training
    group.eval()
    device = accelerator.device
    idx = eval_indices(len(dataset), *placement.data_world())
    counts = torch.zeros(3, num_peers + 1, device=device)  # rows: top1, top5, n; column P: the ensemble
    for batch in make_eval_loader(dataset, batch_size, idx, num_workers):
        x = augment(batch["image"].to(device), None, train=False)
        y = batch["target"].to(device)
        with accelerator.autocast():
            logits = placement.exchange(group(x)).logits.float()  # [P, B, C]
        logits = torch.cat([logits, logits.mean(0, keepdim=True)])  # the ensemble as row P
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # [P+1, B, k]
        hit = top == y[None, :, None]
        counts[0] += hit[..., 0].sum(1)
        counts[1] += hit.any(-1).sum(1)
        counts[2] += y.numel()
    group.train(was_training)
    counts = placement.sum_over_data_ranks(counts).tolist()
    top1 = [100.0 * c / n for c, n in zip(counts[0], counts[2])]
    top5 = [100.0 * c / n for c, n in zip(counts[1], counts[2])]
    return {"top1": top1[:-1], "top5": top5[:-1], "ensemble_top1": top1[-1], "n": int(counts[2][0])}
