"""The EMA teacher against its formula."""
import pytest
import torch
from torch import nn

from mclfir_dist.methods.teacher import EMATeacher


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
    assert teacher.updates == 1 and int(teacher.num_updates) == 1


def test_repeated_updates_track_the_same_student_tensors_and_a_new_student_is_picked_up():
    """The tensor lists are cached: later in-place changes of the student must still be seen, and a
    different student object (a rebuilt model) must be listed again, not the cached one used."""
    student = make_encoder()
    teacher = EMATeacher(student, decay=0.5)
    reference = [p.detach().clone() for p in teacher.module.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
            student[1].running_mean.add_(1.0)
        teacher.update(student)
        reference = [0.5 * r + 0.5 * s.detach() for r, s in zip(reference, student.parameters())]
    for t, r in zip(teacher.module.parameters(), reference):
        torch.testing.assert_close(t, r)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    other = make_encoder()
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(7.0)
    teacher.update(other)
    for t, r in zip(teacher.module.parameters(), reference):
        torch.testing.assert_close(t, 0.5 * r + 3.5)


def test_a_student_in_another_dtype_is_converted():
    student = make_encoder()
    teacher = EMATeacher(student, decay=0.75)
    before = [p.detach().clone() for p in teacher.module.parameters()]
    half = make_encoder().to(torch.bfloat16)
    teacher.update(half)
    for t, b, s in zip(teacher.module.parameters(), before, half.parameters()):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s.float(), rtol=0, atol=1e-6)


def test_a_compiled_encoder_gets_a_teacher_with_its_own_weights():
    """The teacher is a deepcopy of a module.compile()'d trunk: its compiled call must run the copy's
    weights, not the student's (else the teacher equals the student and distillation is void)."""
    from mclfir_dist.model.mclfir import compile_module
    student = make_encoder().eval()
    compile_module(student, backend="eager")   # inductor would only add compile time here
    teacher = EMATeacher(student, decay=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(teacher(x), student(x))
        torch.testing.assert_close(teacher(x), teacher.module._call_impl(x))   # compiled == eager, own weights


def test_warmup_is_a_linear_ramp_to_the_decay_and_matches_a_reference_recursion():
    """d_n = d * min(1, n / w): the teacher starts as the student and uses the full decay from update w on.
    (The old rule min(d, (1+n)/(w+n)) with w=50, d=0.995 was still at 0.9075 after 480 updates.)"""
    w, d = 50, 0.995
    teacher = EMATeacher(make_encoder(), decay=d, warmup_steps=w)
    assert [teacher.decay_at(n) for n in (0, 25, 50, 480)] == [0.0, pytest.approx(d / 2), d, d]
    student = make_encoder()
    reference = [p.clone() for p in teacher.module.parameters()]
    g = torch.Generator().manual_seed(1)
    for n in range(60):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        decay = d * min(1.0, n / w)   # written out, not taken from the class
        reference = [decay * r + (1 - decay) * s for r, s in zip(reference, student.parameters())]
        teacher.update(student)
        if n == 0:   # the first update copies the student
            for t, s in zip(teacher.module.parameters(), student.parameters()):
                assert torch.equal(t, s)
    for t, r in zip(teacher.module.parameters(), reference):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-5)
    assert teacher.updates == 60 and int(teacher.num_updates) == 60
    assert all(not p.requires_grad for p in teacher.parameters())


def test_update_count_survives_a_state_dict_round_trip():
    teacher = EMATeacher(make_encoder(), decay=0.9, warmup_steps=10)
    for _ in range(4):
        teacher.update(make_encoder())
    again = EMATeacher(make_encoder(), decay=0.9, warmup_steps=10)
    again.load_state_dict(teacher.state_dict())
    assert again.updates == 4 and again.current_decay() == pytest.approx(0.9 * 4 / 10)


def test_a_student_with_extra_parameters_is_refused():
    teacher = EMATeacher(make_encoder())
    bigger = nn.Sequential(*make_encoder(), nn.Conv2d(2, 2, 1))
    with pytest.raises(RuntimeError, match="differ"):
        teacher.update(bigger)


def test_teacher_stays_in_eval_mode():
    teacher = EMATeacher(make_encoder())
    teacher.train()
    assert not teacher.module.training
    assert not any(m.training for m in teacher.module.modules())
