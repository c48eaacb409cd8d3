"""The EMA teacher against its formula."""
import pytest
import torch
from torch import nn

from mclfir_dist.teacher import EMATeacher


def make_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_update_matches_formula_and_copies_buffers():
    student = make_encoder()
    teacher = EMATeacher(student, decay=0.9)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(4, 3, 8, 8))  # changes BN running stats
    teacher.update(student)
    for t, b, s in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=0, atol=1e-6)
    for tb, sb in zip(teacher.module.buffers(), student.buffers()):
        assert torch.equal(tb, sb)
    assert int(teacher.num_updates) == 1


def test_warmup_schedule_and_no_grad():
    teacher = EMATeacher(make_encoder(), decay=0.999, warmup_steps=10)
    assert teacher.current_decay() == pytest.approx(1 / 10)
    teacher.num_updates.fill_(90)
    assert teacher.current_decay() == pytest.approx(91 / 100)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_stays_in_eval_mode():
    teacher = EMATeacher(make_encoder())
    teacher.train()
    assert not teacher.module.training
    assert not any(m.training for m in teacher.module.modules())
