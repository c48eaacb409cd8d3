"""Doublet InfoNCE against a hand computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from mclfir_dist.methods.losses import DoubletInfoNCE, feature_distillation
from mclfir_dist.data.pairing import positive_index


def hand_loss(emb, value, task, pos, tau, mask_same=False):
    n = len(emb)
    total = 0.0
    for i in range(n):
        s = [float(emb[i] @ emb[k]) / tau for k in range(n)]
        denom = 0.0
        for k in range(n):
            if k == i or task[k] != task[i]:
                continue
            if mask_same and value[k] == value[i] and k != pos[i]:
                continue
            denom += math.exp(s[k])
        total += -(s[pos[i]] - math.log(denom))
    return total / n


def test_three_sample_example_by_hand():
    # two anchors and a negative in 2-D, tau = 0.5; row 0's positive is row 1 and vice versa
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    loss_fn = DoubletInfoNCE(temperature=0.5, gather=False)
    value, task = torch.tensor([0, 0, 1]), torch.zeros(3, dtype=torch.long)
    pos = torch.tensor([1, 0, 1])
    loss, _ = loss_fn(emb, value, task, pos)
    l0 = -(1.2 - math.log(math.exp(1.2) + math.exp(0.0)))
    l1 = -(1.2 - math.log(math.exp(1.2) + math.exp(1.6)))
    l2 = -(1.6 - math.log(math.exp(0.0) + math.exp(1.6)))
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, abs=1e-6)


@pytest.mark.parametrize("mask_same", [False, True])
def test_random_batch_matches_loop(mask_same):
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    value = torch.randint(0, 3, (12,), generator=g)
    task = torch.tensor([0, 0, 1, 1, 0, 1] * 2)
    value[6:] = value[:6]  # anchors/positives share values
    pos = positive_index(12)
    loss, stats = DoubletInfoNCE(0.3, mask_same_value=mask_same, gather=False)(emb, value, task, pos)
    assert loss.item() == pytest.approx(hand_loss(emb, value.tolist(), task.tolist(), pos.tolist(), 0.3, mask_same), abs=1e-5)
    # other tasks never compete: the pool is the same-task samples minus self
    if not mask_same:
        assert float(stats["negative_pool"]) == pytest.approx(5.0)


def test_multi_positive_averages_over_same_value():
    emb = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    value = torch.tensor([0, 0, 1, 0, 0, 1])
    task = torch.zeros(6, dtype=torch.long)
    loss, _ = DoubletInfoNCE(0.3, multi_positive=True, gather=False)(emb, value, task, positive_index(6))
    logits = emb @ emb.t() / 0.3
    expect = 0.0
    for i in range(6):
        others = [k for k in range(6) if k != i]
        lse = torch.logsumexp(logits[i, others], 0)
        ps = [k for k in others if value[k] == value[i]]
        expect += -sum((logits[i, p] - lse).item() for p in ps) / len(ps)
    assert loss.item() == pytest.approx(expect / 6, abs=1e-5)


def test_feature_distillation_is_mse():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert feature_distillation(a, b).item() == 1.0


def test_loss_is_fp32_under_bf16_autocast():
    """The similarity matmul and the softmax run in fp32 whatever the autocast (bf16 moved the loss by ~1e-2)."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(128, 64), dim=1)
    value = torch.randint(0, 5, (128,))
    task = torch.zeros(128, dtype=torch.long)
    pos = (torch.arange(128) + 64) % 128
    loss_fn = DoubletInfoNCE(0.07)
    reference, _ = loss_fn(emb, value, task, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = loss_fn(emb, value, task, pos)
    assert under_autocast.dtype == torch.float32
    assert (under_autocast - reference).abs().item() < 1e-6
