"""LoRA+ (Hayou et al. 2024, arXiv:2402.12354) through the real setup path: `peft.loraplus_ratio`
reaches the optimizer built by engine.train.build_everything as two learning rates, the schedule
keeps their ratio, and the first Adam step moves B by ratio x lr."""

import json
from dataclasses import replace

import pytest

from tests.conftest import make_tiny_model_dir
from engine.config import DataConfig, ModelConfig, OptimConfig, PeftConfig, RunConfig, TrainConfig
from engine.parallel.distributed import init_distributed
from engine.train import build_everything

LR = 1e-3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loraplus")
    with open(root / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i} twice"},
                                             {"role": "assistant", "content": f"{i} {i}"}]}) + "\n")
    return root, make_tiny_model_dir(root, "llama")


def _cfg(workdir, **peft) -> RunConfig:
    root, model_dir = workdir
    return RunConfig(output_dir=str(root / "run"), model=ModelConfig(path=str(model_dir)),
                     data=DataConfig(train_path=str(root / "train.jsonl"), max_seq_len=64,
                                     cache_dir=str(root / "cache")),
                     peft=PeftConfig(r=4, alpha=8, **peft),
                     optim=OptimConfig(lr=LR, warmup_steps=0, schedule="constant", weight_decay=0.0),
                     train=TrainConfig(max_steps=4, micro_batch_size=2, precision="fp32", plots=False)).validate()


def _groups(optimizer) -> dict:
    return {g["name"]: g for g in optimizer.param_groups}


@pytest.mark.parametrize("ratio", [0.0, 16.0])
def test_build_everything_gives_two_learning_rates(workdir, ratio):
    model, _, _, _, _, optimizer, scheduler, _, _, _, _, _ = build_everything(_cfg(workdir, loraplus_ratio=ratio),
                                                                     init_distributed("cpu"))
    groups = _groups(optimizer)
    assert set(groups) == {"lora_A", "lora_B"}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_A" in names[id(p)] for p in groups["lora_A"]["params"])
    assert all("lora_B" in names[id(p)] for p in groups["lora_B"]["params"])
    assert len(groups["lora_A"]["params"]) == len(groups["lora_B"]["params"]) == 14
    expected_b = LR * (ratio if ratio > 0 else 1.0)
    assert groups["lora_A"]["lr"] == LR and groups["lora_B"]["lr"] == pytest.approx(expected_b)
    optimizer.step()
    scheduler.step()
    assert groups["lora_B"]["lr"] / groups["lora_A"]["lr"] == pytest.approx(expected_b / LR)


def test_first_adam_step_moves_b_by_ratio_times_lr(workdir):
    """Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): B moves by 16 lr; A, whose grad
    is 0 while B = 0, does not move."""
    from engine.training.loss import causal_lm_loss
    model, _, _, _, loader, optimizer, _, _, _, _, _, _ = build_everything(_cfg(workdir, loraplus_ratio=16.0),
                                                                  init_distributed("cpu"))
    groups = _groups(optimizer)
    before = {g: [p.detach().clone() for p in groups[g]["params"]] for g in groups}
    loss, _ = causal_lm_loss(model, next(iter(loader)), chunk_size=None)
    loss.backward()
    optimizer.step()
    step_b = max((p - q).abs().max().item() for p, q in zip(groups["lora_B"]["params"], before["lora_B"]))
    step_a = max((p - q).abs().max().item() for p, q in zip(groups["lora_A"]["params"], before["lora_A"]))
    assert step_b == pytest.approx(16 * LR, rel=1e-3) and step_a == 0.0


def test_dora_magnitudes_get_the_base_learning_rate(workdir):
    """The DoRA magnitude is neither A nor B: group "other" at lr (PEFT's create_loraplus_optimizer
    puts 1-D parameters with B, at ratio x lr; engine/training/optim.py does not)."""
    model, _, _, _, _, optimizer, _, _, _, _, _, _ = build_everything(_cfg(workdir, loraplus_ratio=4.0, use_dora=True),
                                                             init_distributed("cpu"))
    groups = _groups(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["other"]["params"]} == {"lora_magnitude_vector"}
    assert groups["other"]["lr"] == LR and groups["lora_B"]["lr"] == pytest.approx(4 * LR)


def test_negative_ratio_is_a_config_error(workdir):
    from engine.config import ConfigError
    cfg = _cfg(workdir)
    with pytest.raises(ConfigError, match="peft.loraplus_ratio': must be >= 0, got -1"):
        replace(cfg, peft=replace(cfg.peft, loraplus_ratio=-1.0)).validate()
