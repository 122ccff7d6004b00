"""Losses, Sinkhorn-Knopp centring and collapse metrics (recipe section 1).

Pure functions. Everything runs in fp32 with autocast disabled, so calling them inside a
bf16 autocast region is safe. Notation: B images per worker, S student crops
(2 global + n_l local), K prototypes, M masked tokens, D feature width.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_logsumexp(x: torch.Tensor, dim: Optional[int], distributed: bool) -> torch.Tensor:
    """logsumexp over ``dim`` (None: all elements) of the tensor concatenated over workers.

    The max is all-reduced (MAX) and subtracted before ``exp``, so no overflow; summing in
    this shifted domain keeps every term exact. Returns keepdim-shaped output ([1, 1] for None).
    """
    if dim is None:
        x = x.reshape(1, -1)
        dim = 1
    if not distributed:  # one fused kernel, same value
        return torch.logsumexp(x, dim=dim, keepdim=True)
    if x.shape[dim] == 0:  # this worker has no rows (e.g. no masked tokens)
        m = x.new_full([1 if d == dim else s for d, s in enumerate(x.shape)], -math.inf)
    else:
        m = x.amax(dim=dim, keepdim=True)
    if distributed:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (x - m).exp().sum(dim=dim, keepdim=True)
    if distributed:
        dist.all_reduce(s)
    return m + s.log()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets, balanced across all workers.

    ``logits [N, K]`` (N local rows) -> probabilities ``[N, K]`` (fp32, rows sum to 1; over the
    concatenated batch of all workers every prototype gets mass ``N_total / K``).

    The recipe's steps ``Q = exp(logits / T).T; Q /= sum(Q); 3 x (Q /= rowsum; Q /= K;
    Q /= colsum; Q /= N_total); Q *= N_total`` are carried out in log space: each
    normalisation subtracts an all-reduced logsumexp whose max is the GLOBAL max over
    workers. This equals the recipe exactly (the shift cancels in every ratio) and, unlike
    a single exp after subtracting the global max, cannot underflow a whole prototype row
    to 0 (0/0 = NaN) when logits spread more than ~87*T. ``N_total`` is the all-reduced
    row count (CLS: 2*B*W crops; iBOT: all masked tokens), so the result equals the
    single-process result on the concatenated batch.
    """
    with _no_autocast(logits):
        distributed = _distributed()
        n_k = logits.shape[1]
        if distributed:  # stays on the device: no host sync in the step
            n_total = torch.tensor([float(logits.shape[0])], device=logits.device, dtype=torch.float64)
            dist.all_reduce(n_total)
            log_n_total = n_total.clamp_min(1.0).log().float()
        else:  # a tensor, not math.log(N): a compiled graph would specialise on N (masked-token count)
            log_n_total = torch.full((), logits.shape[0], dtype=torch.float32, device=logits.device).clamp_min(1.0).log()

        lq = logits.float() / temp  # log Q^T: [N, K]
        lq = lq - _global_logsumexp(lq, None, distributed)  # Q /= Q.sum()
        for _ in range(n_iterations):
            # each prototype (column here) gets total mass 1/K, summed over all workers' rows
            lq = lq - _global_logsumexp(lq, 0, distributed) - math.log(n_k)
            # each sample (row here, local) gets mass 1/N_total
            lq = lq - torch.logsumexp(lq, dim=1, keepdim=True) - log_n_total
        return (lq + log_n_total).exp()


def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
              globals_first: bool = True, n_pairs: Optional[int] = None) -> torch.Tensor:
    """Cross-view DINO (CLS) loss.

    ``student_logits [S, B, K]``: crops ordered [global 0, global 1, local 0..n_l-1];
    ``teacher_probs [2, B, K]``: Sinkhorn targets of the two unmasked global crops.
    Pairs: student global i vs teacher global j for i != j, every local vs both teacher
    globals; each term ``-sum_k p_t log_softmax(s / T_s)`` averaged over B; the sum over
    pairs is divided by the pair count ``2 + 2 * n_l``. Returns an fp32 scalar.

    Partial sums (one backward per crop group): ``globals_first=False`` when
    ``student_logits`` holds local crops only (no same-crop pair to drop), and ``n_pairs``
    the pair count of the whole loss, so that the parts add up to it.
    """
    with _no_autocast(student_logits):
        n_s, b, _ = student_logits.shape
        n_t = teacher_probs.shape[0]
        logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        # ce[s, t] = mean_b CE(student crop s, teacher crop t): one [S, B*K] x [B*K, T] matmul
        ce = -(logp.reshape(n_s, -1) @ teacher_probs.float().reshape(n_t, -1).T) / b
        total = ce.sum()
        if globals_first:
            total = total - torch.diagonal(ce[:n_t, :n_t]).sum()  # student global i vs teacher global i
        if n_pairs is None:
            n_pairs = n_s * n_t - (n_t if globals_first else 0)
        return total / n_pairs


def ibot_loss(student_logits_masked: torch.Tensor, teacher_probs_masked: torch.Tensor, weights: torch.Tensor,
              n_global_crops: int, student_temp: float) -> torch.Tensor:
    """Masked-patch (iBOT) loss.

    ``student_logits_masked [M, K]`` and ``teacher_probs_masked [M, K]``: the M masked
    tokens of this worker (same order); ``weights [M]``: 1 / (masked tokens in the token's
    crop). Weighted per-token cross-entropy summed, divided by ``n_global_crops`` (2B;
    unmasked crops count as zero). Returns an fp32 scalar (0 when M == 0).
    """
    with _no_autocast(student_logits_masked):
        logp = F.log_softmax(student_logits_masked.float() / student_temp, dim=-1)
        ce = -(teacher_probs_masked.float() * logp).sum(dim=-1)  # [M]
        return (ce * weights.float()).sum() / n_global_crops


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser of one crop's embeddings.

    ``x [B, D]`` (student backbone CLS after the final norm, one global crop) -> scalar
    ``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows, nearest neighbour by
    max cosine excluding self. Needs B >= 2 (returns 0 otherwise, still in the graph).
    """
    with _no_autocast(x):
        x = x.float()
        if x.shape[0] < 2:
            return x.sum() * 0.0
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-1.0)
            nn_idx = dots.argmax(dim=1)
        d = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
        return -torch.log(d + eps).mean()


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
    """Gram anchoring: MSE between per-image patch Gram matrices.

    ``student_patches, teacher_patches [N, P, D]`` (final-norm patch tokens); rows are
    L2-normalised, ``G = X X^T [N, P, P]``; returns ``mean((G_s - G_t)^2)``.
    """
    with _no_autocast(student_patches):
        s = F.normalize(student_patches.float(), dim=-1)
        t = F.normalize(teacher_patches.float(), dim=-1)
        return F.mse_loss(s @ s.transpose(1, 2), t @ t.transpose(1, 2))


# ---- collapse metrics (no grad) -------------------------------------------------------

@torch.no_grad()
def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean row entropy (nats) of ``probs [N, K]``; ln K for uniform rows, 0 for one-hot."""
    p = probs.float()
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


@torch.no_grad()
def kl_student_teacher(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean ``KL(softmax(s / T_s) || p_t)`` over rows of ``[N, K]``."""
    logp_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    logp_t = teacher_probs.float().clamp_min(1e-30).log()
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean()


@torch.no_grad()
def embedding_std(x: torch.Tensor) -> torch.Tensor:
    """Std across the batch of L2-normalised ``x [N, D]``, averaged over D.

    ~1/sqrt(D) for well-spread embeddings, -> 0 under collapse.
    """
    return F.normalize(x.float(), dim=-1).std(dim=0).mean()
