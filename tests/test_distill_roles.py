import torch

from distill.roles import FakeScore, Teacher, generator_from
from tests.dummies import make


def _inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    text = torch.randn(2, 5, cfg.cross_attention_dim, generator=gen)
    return x, torch.tensor([500, 300]), text


def test_lora_fake_score_disabled_is_the_teacher_bit_for_bit():
    pipe = make("pixart")
    teacher = Teacher(pipe.transformer, pipe.scheduler)
    x, t, text = _inputs(teacher.model)
    before = teacher.x0(x, t, text).clone()
    fake = FakeScore.lora_on(teacher, rank=4)
    params = fake.parameters()
    assert params and all("lora_" in n for n, p in fake.module.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = fake.x0(x, t, text).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with fake.as_teacher():
        assert torch.equal(teacher.x0(x, t, text), before)
    with torch.no_grad():
        assert not torch.equal(fake.x0(x, t, text), before)


def test_full_copies_start_at_the_teacher_and_train_separately():
    pipe = make("pixart")
    teacher = Teacher(pipe.transformer, pipe.scheduler)
    x, t, text = _inputs(teacher.model, 1)
    gen = generator_from(teacher)
    fake = FakeScore.copy_of(teacher)
    with torch.no_grad():
        assert torch.equal(teacher.raw_x0(gen, x, t, text), teacher.x0(x, t, text))
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in gen.parameters()) and fake.parameters()
