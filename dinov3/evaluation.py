"""Frozen-feature evaluation (recipe section 6): weighted k-NN and linear probe."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (10, 20, 100), T: float = 0.07,
                 n_classes: Optional[int] = None, chunk_size: int = 256) -> Dict[int, float]:
    """Weighted k-NN top-1 accuracy (%) per k, DINO protocol.

    ``train_feats [N, D]``, ``train_labels [N]``, ``test_feats [Q, D]``, ``test_labels [Q]``.
    Features are L2-normalised; each query votes with its top-k cosine neighbours weighted
    by ``exp(sim / T)``. Queries are processed in chunks of ``chunk_size`` (memory Q x N
    per chunk only). k larger than N is clipped to N.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    train_labels = train_labels.to(train.device).long()
    test_labels = test_labels.to(train.device).long()
    if n_classes is None:
        n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = list(ks)
    k_max = min(max(ks), train.shape[0])
    correct = {k: 0 for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        q = test[start:start + chunk_size]
        sim, idx = (q @ train.T).topk(k_max, dim=1)  # sorted, descending
        votes = F.one_hot(train_labels[idx], n_classes).float() * (sim / T).exp().unsqueeze(-1)  # [q, k, C]
        cum = votes.cumsum(dim=1)  # cum[:, k-1] = votes of the top-k
        target = test_labels[start:start + chunk_size]
        for k in ks:
            pred = cum[:, min(k, k_max) - 1].argmax(dim=1)
            correct[k] += int((pred == target).sum())
    return {k: 100.0 * correct[k] / max(test.shape[0], 1) for k in ks}


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, n_classes: Optional[int] = None,
                 lrs: Sequence[float] = (1e-3, 1e-2, 1e-1), epochs: int = 100, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0) -> Dict[str, float]:
    """Linear probe on frozen features (e.g. :meth:`DINOv3.probe_features`: CLS ++ mean patch).

    ``train_feats [N, F]`` -> features standardised with train statistics, a linear layer
    trained with SGD (momentum 0.9, cosine LR) for each lr in ``lrs``. Returns
    ``{"top1": best top-1 %, "lr": its lr, "top1_lr<lr>": ...}``.
    """
    gen = torch.Generator().manual_seed(seed)
    x_tr, x_te = train_feats.float().cpu(), test_feats.float().cpu()
    y_tr, y_te = train_labels.long().cpu(), test_labels.long().cpu()
    if n_classes is None:
        n_classes = int(max(y_tr.max(), y_te.max())) + 1
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    n = x_tr.shape[0]
    steps_per_epoch = max((n + batch_size - 1) // batch_size, 1)
    out: Dict[str, float] = {}
    best = (-1.0, float("nan"))
    for lr in lrs:
        layer = torch.nn.Linear(x_tr.shape[1], n_classes)
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
        opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                sel = perm[i:i + batch_size]
                loss = F.cross_entropy(layer(x_tr[sel]), y_tr[sel])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            acc = 100.0 * float((layer(x_te).argmax(1) == y_te).float().mean())
        out[f"top1_lr{lr:g}"] = acc
        if acc > best[0]:
            best = (acc, lr)
    out["top1"], out["lr"] = best
    return out
