"""The speed switch grouped_lora (engine/layers/groups.py): sibling LoRA layers reading the same input share one
A matmul; the step computes what the ungrouped layers do, members reading another input leave
their group, nothing is cached past the parent's forward, and the switch is reversible."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.layers.lora import lora_state_dict, mark_only_lora_trainable
from engine.layers.inject import inject_lora
from engine.layers.groups import SharedInputGroup, set_grouped_lora
from tests.conftest import make_tiny_model


def _lora_model(family="llama", dropout=0.0, use_dora=False):
    model, _ = make_tiny_model(family)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", 4, 8.0, dropout=dropout, use_dora=use_dora)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.train()


def _step(model, ids, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _groups(model):
    return {id(m.shared_input): sorted(n.rsplit(".", 1)[-1] for n, x in model.named_modules()
                                       if getattr(x, "shared_input", None) is m.shared_input)
            for m in model.modules() if getattr(m, "shared_input", None) is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_grouped_step_equals_the_ungrouped_one(family, dtype):
    model = _lora_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    plain = _step(model, ids, dtype)
    assert set_grouped_lora(model, True) > 0
    first = _step(model, ids, dtype)    # learns who shares (o_proj leaves)
    second = _step(model, ids, dtype)
    for loss, grads in (first, second):
        tol = 1e-6 if dtype is None else 2e-2
        torch.testing.assert_close(loss, plain[0], atol=tol, rtol=tol)
        assert grads.keys() == plain[1].keys() == set(k for k in lora_state_dict(model))
        for k, g in plain[1].items():
            torch.testing.assert_close(grads[k], g, atol=tol * max(1.0, g.abs().max().item()), rtol=tol)


def test_who_shares_qkv_and_gate_up(monkeypatch):
    """{q, k, v, o} and {gate, up} per block; q, k, v and gate, up read the shared projection,
    o_proj (another input) and down_proj (no group) run their own A matmul."""
    model = _lora_model("llama")
    layers = model.config.num_hidden_layers
    assert set_grouped_lora(model, True) == 2 * layers
    assert sorted(map(tuple, _groups(model).values())) == sorted([("k_proj", "o_proj", "q_proj", "v_proj"),
                                                                  ("gate_proj", "up_proj")] * layers)
    owners = {m.lora_A: n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    alone = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        if self in owners:
            alone.append(owners[self])
        return original(self, x)
    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    _step(model, torch.randint(0, model.config.vocab_size, (1, 6)))
    assert sorted(alone) == sorted(["o_proj", "down_proj"] * layers)
    # phi3: a fused qkv_proj shares a width with o_proj but not an input; both project alone
    phi3 = _lora_model("phi3")
    assert set_grouped_lora(phi3, True) == phi3.config.num_hidden_layers


def test_nothing_outlives_the_parent_forward_and_the_switch_is_reversible():
    model = _lora_model("llama")
    set_grouped_lora(model, True)
    _step(model, torch.randint(0, model.config.vocab_size, (1, 6)))
    groups = {m.shared_input for m in model.modules() if getattr(m, "shared_input", None) is not None}
    assert groups and all(g._x is None and g._xa is None for g in groups)
    clone = copy.deepcopy(model)  # a copy's hooks belong to the copy's groups
    assert set_grouped_lora(model, False) == 0
    assert all(getattr(m, "shared_input", None) is None for m in model.modules())
    assert not any(isinstance(getattr(fn, "__self__", None), SharedInputGroup)
                   for m in model.modules() for fn in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values()))
    assert any(getattr(m, "shared_input", None) is not None for m in clone.modules())
    assert set_grouped_lora(model, True) == set_grouped_lora(model, True)  # idempotent


@pytest.mark.parametrize("kwargs", [{"dropout": 0.1}, {"use_dora": True}])
def test_dropout_and_dora_layers_are_not_grouped(kwargs):
    assert set_grouped_lora(_lora_model(**kwargs), True) == 0


def test_a_member_called_with_another_tensor_gets_its_own_projection():
    """Identity, not shape, decides: an equal-shaped other tensor never reads the shared
    projection; outside the parent's forward every member projects alone."""
    model = _lora_model("llama")
    attn = model.model.layers[0].self_attn
    set_grouped_lora(model, True)
    group = attn.q_proj.shared_input
    x, y = torch.randn(1, 3, model.config.hidden_size), torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        group.project(attn.q_proj, x)
        assert group._x is None  # not inside the parent's forward: nothing cached
        group.begin()
        torch.testing.assert_close(group.project(attn.q_proj, x), attn.q_proj.lora_A(x))
        assert group._x is x
        torch.testing.assert_close(group.project(attn.k_proj, y), attn.k_proj.lora_A(y))
        torch.testing.assert_close(group.project(attn.v_proj, x), attn.v_proj.lora_A(x))
        group.end()
        assert group._x is None and group._xa is None


def test_training_runs_with_groups_through_build_model_and_checkpointing(tmp_path):
    from engine.config import ModelConfig, PeftConfig
    from engine.model.build import build_model, enable_activation_checkpointing
    from engine.training.loss import causal_lm_loss
    from tests.conftest import apply_speed, make_tiny_model_dir

    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, "llama"))), PeftConfig(r=4, alpha=8.0),
                           "cpu", torch.float32)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    results = []
    for grouped, ckpt in ((False, False), (True, False), (True, True)):
        m = copy.deepcopy(model).train()
        apply_speed(m, compile=False, disable=[] if grouped else ["grouped_lora"])
        if ckpt:
            enable_activation_checkpointing(m)
        for _ in range(2):  # the second step runs with the learned groups
            m.zero_grad(set_to_none=True)
            loss, _ = causal_lm_loss(m, batch, chunk_size=None)
            loss.backward()
        results.append((loss.detach(), {k: v.grad for k, v in lora_state_dict(m).items()}))
        assert (_groups(m) != {}) == grouped
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=1e-6)
        for key, grad in results[0][1].items():
            torch.testing.assert_close(grads[key], grad, atol=1e-6, rtol=1e-5)
