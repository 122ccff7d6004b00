"""DINOv3 losses and Sinkhorn-Knopp (recipe section 1), checked against independent numpy code."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3.losses import (dino_loss, embedding_std, entropy, gram_loss, ibot_loss, kl_student_teacher,
                           koleo_loss, sinkhorn_knopp)


def sinkhorn_reference(logits: np.ndarray, temp: float, n_iter: int = 3) -> np.ndarray:
    """The recipe's steps, literally, in float64."""
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    q *= n
    return q.T


def log_softmax_np(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ---- Sinkhorn ---------------------------------------------------------------------------

def test_sinkhorn_matches_recipe_rows_sum_to_one_and_mass_balanced():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g) * 0.1
    q = sinkhorn_knopp(logits, temp=0.1)
    np.testing.assert_allclose(q.numpy(), sinkhorn_reference(logits.numpy(), 0.1), atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(64), atol=1e-5, rtol=0)
    # every prototype gets ~N/K of the mass (3 iterations: approximately)
    col = q.sum(0)
    assert torch.allclose(col, torch.full((16,), 64 / 16), rtol=0.05)
    # ... much more balanced than a plain softmax of the same logits
    assert col.std() < 0.2 * torch.softmax(logits / 0.1, dim=1).sum(0).std()


def test_sinkhorn_finite_for_large_logits():
    g = torch.Generator().manual_seed(1)
    logits = 100.0 + torch.randn(32, 64, generator=g) * 5  # exp(100 / 0.04) overflows without the max shift
    logits[0, 0] = 130.0
    for temp in (0.04, 0.07):
        q = sinkhorn_knopp(logits, temp=temp)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(1), torch.ones(32), atol=1e-5, rtol=0)
    # exact: subtracting a constant changes nothing
    small = torch.randn(8, 5, generator=g)
    torch.testing.assert_close(sinkhorn_knopp(small + 100.0, 0.04), sinkhorn_knopp(small, 0.04), atol=1e-5, rtol=0)


def test_sinkhorn_bf16_input_returns_fp32():
    logits = torch.randn(8, 12, dtype=torch.bfloat16)
    q = sinkhorn_knopp(logits, temp=0.07)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.sum(1), torch.ones(8), atol=1e-5, rtol=0)


def test_sinkhorn_empty_input():
    q = sinkhorn_knopp(torch.zeros(0, 7), temp=0.07)
    assert q.shape == (0, 7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sinkhorn_worker(rank, world, port, chunks, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = [sinkhorn_knopp(c[rank], temp) for c, temp in chunks]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_distributed_equals_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(2)
    full_a = torch.randn(12, 10, generator=g) * 3
    full_b = 100.0 + torch.randn(9, 10, generator=g) * 4  # large logits, uneven split 5 + 4
    full_c = torch.randn(4, 10, generator=g)  # one worker without rows (iBOT with no masked token)
    cases = [(full_a, (6, 6), 0.07), (full_b, (5, 4), 0.04), (full_c, (0, 4), 0.07)]
    chunks = [(list(torch.split(full, sizes)), temp) for full, sizes, temp in cases]
    mp.spawn(_sinkhorn_worker, args=(2, _free_port(), chunks, str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, (full, _, temp) in enumerate(cases):
        got = torch.cat([per_rank[0][i], per_rank[1][i]])
        torch.testing.assert_close(got, sinkhorn_knopp(full, temp), atol=1e-5, rtol=0)


# ---- DINO loss -----------------------------------------------------------------------------

def test_dino_loss_hand_worked_two_global_two_local():
    rng = np.random.default_rng(0)
    b, k, temp = 2, 5, 0.1
    s = rng.normal(size=(4, b, k)).astype(np.float32)  # [g0, g1, l0, l1]
    t = rng.dirichlet(np.ones(k), size=(2, b)).astype(np.float32)
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]  # cross pairs; locals vs both globals
    terms = [np.mean(-(t[j] * log_softmax_np(s[i] / temp)).sum(-1)) for i, j in pairs]
    expected = sum(terms) / (2 + 2 * 2)
    got = dino_loss(torch.from_numpy(s), torch.from_numpy(t), temp)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_dino_loss_no_locals_and_temperature_matters():
    rng = np.random.default_rng(1)
    s = torch.from_numpy(rng.normal(size=(2, 3, 4)).astype(np.float32))
    t = torch.from_numpy(rng.dirichlet(np.ones(4), size=(2, 3)).astype(np.float32))
    expected = 0.5 * (np.mean(-(t[1].numpy() * log_softmax_np(s[0].numpy() / 0.2)).sum(-1))
                      + np.mean(-(t[0].numpy() * log_softmax_np(s[1].numpy() / 0.2)).sum(-1)))
    assert float(dino_loss(s, t, 0.2)) == pytest.approx(expected, rel=1e-5)
    assert float(dino_loss(s, t, 0.2)) != pytest.approx(float(dino_loss(s, t, 0.1)), rel=1e-3)


# ---- iBOT loss -----------------------------------------------------------------------------

def test_ibot_loss_weights_tokens_by_their_crop():
    rng = np.random.default_rng(2)
    k, temp = 6, 0.1
    counts = [1, 3, 0, 2]  # masked tokens per global crop (2B = 4 crops, one unmasked)
    m = sum(counts)
    s = rng.normal(size=(m, k)).astype(np.float32)
    t = rng.dirichlet(np.ones(k), size=m).astype(np.float32)
    ce = -(t * log_softmax_np(s / temp)).sum(-1)
    expected, i = 0.0, 0
    for c in counts:  # mean over each crop's masked tokens, summed, / 2B
        if c:
            expected += ce[i:i + c].mean()
        i += c
    expected /= len(counts)
    weights = torch.tensor([1 / c for c in counts for _ in range(c)])
    got = ibot_loss(torch.from_numpy(s), torch.from_numpy(t), weights, len(counts), temp)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    empty = ibot_loss(torch.zeros(0, k, requires_grad=True), torch.zeros(0, k), torch.zeros(0), 4, temp)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


# ---- KoLeo -----------------------------------------------------------------------------------

def test_koleo_hand_made_points():
    a = math.radians(10)
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [math.cos(a), math.sin(a)]])
    # nearest neighbours (by angle): 0<->3 (10 deg), 1->3 (80 deg), 2->1 (90 deg), 3->0
    d = [2 * math.sin(a / 2), 2 * math.sin(math.radians(40)), math.sqrt(2), 2 * math.sin(a / 2)]
    expected = -sum(math.log(x + 1e-8) for x in d) / 4
    assert float(koleo_loss(pts)) == pytest.approx(expected, abs=1e-5)
    assert float(koleo_loss(3.0 * pts)) == pytest.approx(expected, abs=1e-5)  # rows are normalised first
    assert float(koleo_loss(pts.bfloat16())) == pytest.approx(expected, abs=2e-2)


def test_koleo_gradient_spreads_points():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- Gram and metrics ------------------------------------------------------------------------

def test_gram_loss_per_image():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    sn, tn = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    expected = ((sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(gram_loss(s, t), expected)
    assert float(gram_loss(s, 2 * s)) == pytest.approx(0.0, abs=1e-6)


def test_collapse_metrics():
    k = 16
    assert float(entropy(torch.full((4, k), 1 / k))) == pytest.approx(math.log(k), rel=1e-5)
    assert float(entropy(torch.eye(k)[:4])) == pytest.approx(0.0, abs=1e-5)
    logits = torch.randn(4, k)
    p = torch.softmax(logits / 0.1, dim=-1)
    assert float(kl_student_teacher(logits, p, 0.1)) == pytest.approx(0.0, abs=1e-4)
    assert float(embedding_std(torch.ones(8, 4))) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_std(torch.randn(512, 4))) > 0.3
