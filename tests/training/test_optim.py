"""engine.training.optim: named groups, LoRA+, AdamW / bitsandbytes paged AdamW, schedules and resume."""

import math
import sys

import pytest
import torch
from torch import nn

from engine.config import ConfigError, OptimConfig
from engine.training.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups


class TinyLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(80, 80).requires_grad_(False)
        self.lora_A = nn.ParameterDict({"weight": nn.Parameter(torch.randn(64, 80) * 0.1)})
        self.lora_B = nn.ParameterDict({"weight": nn.Parameter(torch.zeros(80, 64))})
        self.lora_magnitude = nn.Parameter(torch.ones(80))

    def forward(self, x):
        return (self.base(x) + x @ self.lora_A["weight"].T @ self.lora_B["weight"].T) * self.lora_magnitude


def groups_by_name(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_groups_are_named_and_loraplus_scales_only_b():
    model = TinyLoRA()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.01), loraplus_ratio=16.0)
    groups = groups_by_name(opt)
    assert set(groups) == {"lora_A", "lora_B", "other"}
    assert groups["lora_A"]["lr"] == 1e-3 and groups["other"]["lr"] == 1e-3
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert groups["lora_B"]["params"] == [model.lora_B["weight"]]
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    # frozen base weights are left out
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.base.weight) not in in_opt and len(in_opt) == 3
    plain = groups_by_name(build_optimizer(model, OptimConfig(lr=1e-3)))
    assert plain["lora_B"]["lr"] == plain["lora_A"]["lr"] == 1e-3


def test_named_pairs_and_bare_parameters():
    model = TinyLoRA()
    pairs = build_optimizer(list(model.named_parameters()), OptimConfig(lr=2e-4), loraplus_ratio=4)
    assert groups_by_name(pairs)["lora_B"]["lr"] == pytest.approx(8e-4)
    bare = build_optimizer(model.parameters(), OptimConfig(lr=2e-4))
    assert [g["name"] for g in bare.param_groups] == ["params"]
    assert len(bare.param_groups[0]["params"]) == 3


def test_adamw_is_fused_on_cpu_and_updates_as_the_foreach_one():
    """The fused CPU kernel (the default on a CPU) and the multi-tensor one take the same steps."""
    models = [TinyLoRA(), TinyLoRA()]
    fused = build_optimizer(models[0], OptimConfig(lr=1e-2, weight_decay=0.1))
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    foreach = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    before = models[0].lora_B["weight"].clone()
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for model, opt in zip(models, (fused, foreach)):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    assert not torch.equal(before, models[0].lora_B["weight"])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_stays_foreach_for_sharded_cpu_parameters(monkeypatch):
    import engine.training.optim

    monkeypatch.setattr(engine.training.optim, "_is_dtensor", lambda p: True)  # as FSDP's DTensor shards
    opt = build_optimizer(TinyLoRA(), OptimConfig(lr=1e-2))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_bitsandbytes_paged_adamw_builds_and_steps_on_cpu(name):
    bnb = pytest.importorskip("bitsandbytes")
    model = TinyLoRA()
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2), loraplus_ratio=2.0)
    expected = bnb.optim.PagedAdamW32bit if name.endswith("32bit") else bnb.optim.PagedAdamW8bit
    assert type(opt) is expected
    assert groups_by_name(opt)["lora_B"]["lr"] == pytest.approx(2e-2)
    before = model.lora_A["weight"].clone()
    torch.manual_seed(1)
    model.lora_B["weight"].data.normal_()  # so lora_A gets a gradient
    model(torch.randn(4, 80)).pow(2).sum().backward()
    with pytest.warns(UserWarning, match="not supported on CPU") if not torch.cuda.is_available() else _nothing():
        opt.step()
    assert not torch.equal(before, model.lora_A["weight"])
    # 5,120 elements >= bitsandbytes' min_8bit_size (4,096): the 8-bit moments really are 8-bit
    state_dtype = torch.uint8 if name.endswith("8bit") else torch.float32
    assert opt.state[model.lora_A["weight"]]["state1"].dtype == state_dtype
    restored = build_optimizer(model, OptimConfig(name=name, lr=1e-2), loraplus_ratio=2.0)
    restored.load_state_dict(opt.state_dict())
    assert [g["name"] for g in restored.param_groups] == [g["name"] for g in opt.param_groups]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_missing_bitsandbytes_error_names_key_and_suggests_adamw(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match=r"optim.name.*paged_adamw_8bit.*use optim.name=adamw"):
        build_optimizer(TinyLoRA(), OptimConfig(name="paged_adamw_8bit"))


def test_optimizer_errors():
    with pytest.raises(ConfigError, match=r"'optim.name': 'sgd' is not one of"):
        build_optimizer(TinyLoRA(), OptimConfig(name="sgd"))
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter has requires_grad=True"):
        build_optimizer(frozen, OptimConfig())
    with pytest.raises(ValueError, match="LoRA\\+ .*needs parameter names"):
        param_groups(TinyLoRA().parameters(), 1e-3, 0.0, loraplus_ratio=16)


def test_warmup_then_cosine_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    m = [lr_multiplier(s, cfg, 14) for s in range(16)]
    assert m[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])   # first step is not wasted on lr 0
    assert m[4] == 1.0                                     # peak right after warmup
    assert m[9] == pytest.approx(0.1 + 0.9 * 0.5)           # half way through the decay
    assert m[14] == pytest.approx(0.1) and m[15] == pytest.approx(0.1)  # floor at and after max_steps
    assert all(a >= b for a, b in zip(m[4:], m[5:]))


def test_linear_and_constant_values():
    lin = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_multiplier(s, lin, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimConfig(warmup_steps=1, schedule="constant")
    assert [lr_multiplier(s, const, 10) for s in (0, 1, 5, 50)] == [0.5, 1.0, 1.0, 1.0]
    cos = OptimConfig(warmup_steps=0, schedule="cosine")
    assert lr_multiplier(2, cos, 4) == pytest.approx(0.5) and lr_multiplier(0, cos, 4) == 1.0
    assert lr_multiplier(1, cos, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_scheduler_drives_each_group_and_keeps_loraplus_ratio():
    model = TinyLoRA()
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, schedule="linear")
    opt = build_optimizer(model, cfg, loraplus_ratio=16.0)
    sched = build_scheduler(opt, cfg, max_steps=6)
    seen = []
    for _ in range(6):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert [s["lora_A"] for s in seen] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert all(s["lora_B"] == pytest.approx(16 * s["lora_A"]) for s in seen)


def test_scheduler_resumes_exactly_from_state_dict():
    cfg = OptimConfig(lr=3e-4, warmup_steps=3, schedule="cosine", min_lr_ratio=0.05)

    def run(n_steps, state=None):
        model = TinyLoRA()
        opt = build_optimizer(model, cfg, loraplus_ratio=8.0)
        sched = build_scheduler(opt, cfg, max_steps=20)
        if state is not None:
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        lrs = []
        for _ in range(n_steps):
            lrs.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        return lrs, {"opt": opt.state_dict(), "sched": sched.state_dict()}

    straight, _ = run(20)
    first, state = run(7)
    rest, _ = run(13, state)
    assert first + rest == straight


def test_scheduler_errors():
    opt = build_optimizer(TinyLoRA(), OptimConfig())
    with pytest.raises(ConfigError, match=r"'optim.warmup_steps': 10 warmup steps .*train.max_steps=10"):
        build_scheduler(opt, OptimConfig(warmup_steps=10), max_steps=10)
    with pytest.raises(ConfigError, match=r"'train.max_steps': must be a positive integer, got 0"):
        build_scheduler(opt, OptimConfig(), max_steps=0)
    with pytest.raises(ConfigError, match=r"'optim.schedule': 'step' is not one of"):
        build_scheduler(opt, OptimConfig(schedule="step"), max_steps=10)
