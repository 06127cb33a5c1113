"""objective.share_prompt: a group as one tree document (the prompt once, its completions as
branches, engine/model/prefix_tree.py) gives the loss and LoRA gradients of the unshared
`prompt + completion` documents, for every loss_type, with old (num_iterations > 1) and reference
(beta > 0) log-probs computed through the same batches, on a llama-like model, a sliding window
(Mistral) and soft-capping with a window (Gemma 2), in fp32 and bf16; the batch layout; hostile
rollouts; the refusals."""

from types import SimpleNamespace

import pytest
import torch

from engine.grpo.batches import Rollout, rollout_batches
from engine.grpo.objective import GRPOLoss
from engine.grpo.plugin import GRPO
from engine.layers.lora import lora_state_dict
from engine.model.attention import PackedAttentionError, register_packed_attention
from engine.model.isolation import LEAK_TOLERANCE, tree_leak
from engine.preference.logprobs import token_logps
from engine.training import amp
from tests.conftest import apply_speed, lora_and_peft_twins, make_tiny_model, use_packed_attention

G, L = 4, 7
PROMPTS = [[5, 9, 12, 3, 8, 22, 17, 6, 33, 4, 19], [7, 2, 30, 31, 8, 4, 26, 27, 28, 11, 13, 14, 15]]
COMPLETIONS = [[11, 14, 2], [15, 16, 17, 18, 19, 20, 21], [2], [40, 41, 2],          # prompt 0: one of 1 token
               [42, 43, 44, 45, 2], [46, 47, 48, 49, 50, 51, 52], [53, 54, 2], [55, 56, 57, 58, 59, 60, 61]]
TRUNCATED = [False, True, False, False, False, True, False, True]
ADVANTAGES = [0.9, -0.4, -0.5, 1.2, 0.3, -1.5, 0.7, -0.1]

# (family, config overrides): GQA everywhere (4 heads, 2 KV heads); windows of 8 tokens, shorter
# than the prompts (11, 13) and than prompt + completion
FAMILIES = [("llama", {}), ("mistral", {"sliding_window": 8}),
            ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 20.0})]


def _model(family, overrides, precision):
    base, _ = make_tiny_model(family, seed=3, **overrides)
    if family != "gemma2":
        base.set_attn_implementation("sdpa")
    model, _ = lora_and_peft_twins(base, seed=11)
    if precision == "bf16":
        apply_speed(model, "bf16", compile=False)  # the CPU's bf16 plan: short-document kernel for plain documents
    else:
        use_packed_attention(model)                # the core's reference kernel
    if family == "gemma2":  # eager (no SDPA in this class): the engine's attention set by hand, soft-capping in it
        model.config._attn_implementation = register_packed_attention()
    return model.train()


def _batches(rollout, *, share, loss_type="dapo", mask_truncated=False, max_seq_len=64, micro=2, G=G):
    return rollout_batches(rollout, PROMPTS, num_generations=G, loss_type=loss_type, max_completion_length=L,
                           mask_truncated=mask_truncated, max_seq_len=max_seq_len, micro_batch_size=micro,
                           pad_token_id=0, share_prompt=share)


def _rollout_logps(model, rollout, *, share, beta, iterations, precision, max_seq_len=64):
    """GRPO._rollout_logps (the plugin's own code) on a stand-in plugin that builds these batches."""
    stub = SimpleNamespace(
        setup=SimpleNamespace(model=model, device=torch.device("cpu"), chunk_size=4, precision=precision),
        o=SimpleNamespace(num_iterations=iterations, beta=beta, temperature=0.7),
        _batches=lambda r: _batches(r, share=share, max_seq_len=max_seq_len))
    GRPO._rollout_logps(stub, rollout)


def _loss_and_grads(model, micro, *, beta, precision):
    objective = GRPOLoss(beta=beta, epsilon=0.2, epsilon_high=0.28, temperature=0.7, chunk_size=4)
    count = sum(objective.count(b) for b in micro)
    model.zero_grad()
    total = torch.zeros(())
    for b in micro:
        with amp.autocast(precision, torch.device("cpu")):
            loss_sum, _ = objective.loss_sum(model, b)
        (loss_sum / count).backward()
        total += loss_sum.detach() / count
    return total, {n: p.grad.clone() for n, p in lora_state_dict(model).items()}


def _run(model, *, share, loss_type, beta, iterations, mask_truncated, precision, max_seq_len=64):
    rollout = Rollout([0, 1], COMPLETIONS, TRUNCATED, ADVANTAGES)
    if beta or iterations > 1:
        _rollout_logps(model, rollout, share=share, beta=beta, iterations=iterations, precision=precision,
                       max_seq_len=max_seq_len)
    micro = _batches(rollout, share=share, loss_type=loss_type, mask_truncated=mask_truncated,
                     max_seq_len=max_seq_len)
    loss, grads = _loss_and_grads(model, micro, beta=beta, precision=precision)
    return loss, grads, rollout, micro


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("loss_type,beta,iterations,mask_truncated",
                         [("dapo", 0.0, 1, False), ("grpo", 0.04, 2, True), ("bnpo", 0.04, 1, False),
                          ("dr_grpo", 0.0, 2, True)])
@pytest.mark.parametrize("family,overrides", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_shared_prompt_gives_the_unshared_loss_and_gradients_fp32(family, overrides, loss_type, beta, iterations,
                                                                  mask_truncated):
    model = _model(family, overrides, "fp32")
    kw = dict(loss_type=loss_type, beta=beta, iterations=iterations, mask_truncated=mask_truncated, precision="fp32")
    loss, grads, rollout, micro = _run(model, share=False, **kw)
    shared_loss, shared_grads, shared_rollout, shared_micro = _run(model, share=True, **kw)
    assert sum(b["num_tokens"] for b in shared_micro) < sum(b["num_tokens"] for b in micro)
    assert any(b["packing"].has_trees for b in shared_micro)
    for name in ("old_logps", "ref_logps"):  # the rollout's log-probs, taken through the tree batches
        for a, b in zip(getattr(shared_rollout, name) or [], getattr(rollout, name) or []):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    torch.testing.assert_close(shared_loss, loss, rtol=2e-5, atol=1e-6)
    assert grads.keys() == shared_grads.keys()
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_shared_prompt_in_bf16_is_as_close_to_fp32_as_the_unshared_rows(family, overrides):
    """bf16 autocast (the CPU's bf16 speed plan): the shared rows' loss and gradients are no further
    from the fp32 unshared ones than the unshared bf16 rows are (each within 2x of that error)."""
    kw = dict(loss_type="grpo", beta=0.04, iterations=2, mask_truncated=False)
    ref_loss, ref_grads, *_ = _run(_model(family, overrides, "fp32"), share=False, precision="fp32", **kw)
    model = _model(family, overrides, "bf16")
    loss, grads, *_ = _run(model, share=False, precision="bf16", **kw)
    shared_loss, shared_grads, *_ = _run(model, share=True, precision="bf16", **kw)
    # the loss is a mean of -A_t ratio_t whose advantages cancel: measured against the terms' size
    # (bf16's epsilon x the largest |A|), not against the small sum
    bound = 2 * abs(float(loss - ref_loss)) + torch.finfo(torch.bfloat16).eps * max(map(abs, ADVANTAGES))
    assert abs(float(shared_loss - ref_loss)) <= bound
    flat = lambda g: torch.cat([v.flatten() for _, v in sorted(g.items())])  # noqa: E731
    unshared_error = _rel(flat(grads), flat(ref_grads))
    assert 0 < unshared_error < 0.1
    assert _rel(flat(shared_grads), flat(ref_grads)) <= 2 * unshared_error


def test_the_row_mask_kernel_computes_tree_documents_in_its_one_call():
    """The CPU's fp32 plan (row_attention: one masked SDPA per layer, the trees in its mask) and
    rows longer than its limit (per document + tree_attention) give the reference kernel's numbers."""
    from engine.speed import row_attention

    results = []
    for limit in (None, 256, 16):
        model = _model("mistral", {"sliding_window": 8}, "fp32")
        if limit:
            from engine.model.attention import register_packed_attention, set_attention
            set_attention(model, register_packed_attention(f"engine_packed_test_rows{limit}",
                                                           row_attention.row_mask_kernel(limit)))
        results.append(_run(model, share=True, loss_type="dapo", beta=0.04, iterations=2, mask_truncated=False,
                            precision="fp32")[:2])
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=2e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], results[0][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_batch_layout():
    rollout = Rollout([0, 1], COMPLETIONS, TRUNCATED, ADVANTAGES)
    (batch,) = _batches(rollout, share=True, max_seq_len=64, micro=4)
    packing = batch["packing"]
    trees = sorted(packing.tree_documents(), key=lambda t: t[3])
    assert [(p, list(br)) for _, _, _, p, br in trees] == [(11, [3, 7, 1, 3]), (13, [5, 7, 3, 7])]
    b, start, n, p, branches = trees[0]
    assert n == p + sum(branches)
    ids, pos = batch["input_ids"][b, start:start + n].tolist(), batch["position_ids"][b, start:start + n].tolist()
    assert ids == PROMPTS[0] + sum(COMPLETIONS[:4], [])
    assert pos == list(range(11)) + [11, 12, 13] + list(range(11, 18)) + [11] + [11, 12, 13]
    flat = packing.label_index.tolist()
    end_of_prompt = b * batch["input_ids"].shape[1] + start + p - 1
    assert flat.count(end_of_prompt) == 4           # every completion's first token, from the prompt's last position
    order = batch["token_completion"]
    assert len(order) == len(flat) == packing.label_targets.numel() == batch["advantages"].numel()
    targets = packing.label_targets.tolist()
    for i in range(len(COMPLETIONS)):              # each completion's tokens, in order, once
        assert [t for t, o in zip(targets, order) if o == i] == COMPLETIONS[i]
        assert [a for a, o in zip(batch["advantages"].tolist(), order) if o == i] == pytest.approx([ADVANTAGES[i]] * len(COMPLETIONS[i]))
    first = [k for k, o in enumerate(order) if o == 2]
    assert [flat[k] for k in first] == [end_of_prompt]  # the 1-token completion: only its stop token, at the prompt's end
    assert batch["num_tokens"] == 11 + 14 + 13 + 22 and packing.num_tokens == batch["num_tokens"]


def test_hostile_rollouts_keep_the_unshared_numbers():
    """G = 1 (no tree), a group too long for a row (split into trees, each with the prompt), masked
    truncated completions (left out of the trees)."""
    model = _model("llama", {}, "fp32")
    kw = dict(loss_type="grpo", beta=0.04, iterations=2, mask_truncated=True, precision="fp32")
    for max_seq_len in (64, 24):   # 24: no group fits one row (prompt 11 + 14, prompt 13 + 22 tokens)
        loss, grads, _, micro = _run(model, share=False, max_seq_len=max_seq_len, **kw)
        shared_loss, shared_grads, _, shared_micro = _run(model, share=True, max_seq_len=max_seq_len, **kw)
        torch.testing.assert_close(shared_loss, loss, rtol=2e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(shared_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
        for b in shared_micro:
            assert max(n for row in b["packing"].doc_lengths for n in row) <= max_seq_len
    # a group split over several trees: every tree has the prompt, every completion is there once
    rollout = Rollout([0, 1], COMPLETIONS, [False] * 8, ADVANTAGES)
    micro = _batches(rollout, share=True, max_seq_len=24, micro=8)
    trees = [t for b in micro for t in b["packing"].tree_documents()]
    # prompt 11 + [3, 7, 1] | 11 + [3];  13 + [5] | 13 + [7, 3] | 13 + [7]: the one-completion parts plain
    assert sorted((p, br) for _, _, _, p, br in trees) == [(11, (3, 7, 1)), (13, (7, 3))]
    assert sum(b["num_tokens"] for b in micro) == 22 + 14 + 18 + 23 + 20
    assert sorted(i for b in micro for i in dict.fromkeys(b["token_completion"])) == list(range(8))
    # G = 1: every group a plain document, no tree context at all
    single = Rollout([0, 1], [COMPLETIONS[0], COMPLETIONS[4]], [False, False], [0.5, -0.5])
    micro = rollout_batches(single, PROMPTS, num_generations=1, loss_type="dapo", max_completion_length=L,
                            mask_truncated=False, max_seq_len=64, micro_batch_size=2, pad_token_id=0, share_prompt=True)
    assert all(b["packing"].trees is None for b in micro)
    unshared = rollout_batches(single, PROMPTS, num_generations=1, loss_type="dapo", max_completion_length=L,
                               mask_truncated=False, max_seq_len=64, micro_batch_size=2, pad_token_id=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and a["packing"] == b["packing"]
               for a, b in zip(micro, unshared))


def test_tree_batches_are_refused_where_attention_cannot_honour_them():
    rollout = Rollout([0, 1], COMPLETIONS, TRUNCATED, ADVANTAGES)
    (batch,) = _batches(rollout, share=True, micro=4)
    base, _ = make_tiny_model("llama", seed=3)
    base.set_attn_implementation("sdpa")          # transformers' own SDPA: would split the trees at their restarts
    with pytest.raises(PackedAttentionError, match="share_prompt=false"):
        token_logps(base, batch)
    assert tree_leak(base) == float("inf")
    use_packed_attention(base)
    assert tree_leak(base) <= LEAK_TOLERANCE
    with pytest.raises(PackedAttentionError, match="share_prompt=false"):  # a padding mask beside the trees
        token_logps(base, {**batch, "attention_mask": torch.ones(batch["input_ids"].shape)[:, None, None]})


def test_the_plugin_turns_it_off_where_rows_are_padded_and_says_so(capsys):
    from engine.grpo.plugin import _trees_honoured

    base, _ = make_tiny_model("llama", seed=3)
    base.set_attn_implementation("sdpa")
    use_packed_attention(base)
    setup = SimpleNamespace(packing=False, model=base, precision="fp32")
    assert not _trees_honoured(setup, announce=True)
    assert "share_prompt" in capsys.readouterr().err
    assert _trees_honoured(SimpleNamespace(packing=True, model=base, precision="fp32"), announce=True)
    use_packed_attention(base, False)
    assert not _trees_honoured(SimpleNamespace(packing=True, model=base, precision="fp32"), announce=True)
    assert "packed attention" in capsys.readouterr().err


def test_a_kernel_that_reads_the_whole_batch_never_sees_tree_documents():
    """A varlen-style kernel (no `per_document`, no `takes_trees`: it would read cu_seqlens, where a
    tree is one causal document) is not called for a batch with trees; the reference kernel takes
    its plain documents, and the numbers are the reference's."""
    from engine.model.attention import sdpa_per_document, set_attention

    calls = []

    def whole_batch(query, key, value, docs, *, scale, dropout, packing):
        calls.append(len(docs))
        return sdpa_per_document(query, key, value, docs, scale=scale, dropout=dropout, packing=packing)

    reference = _run(_model("llama", {}, "fp32"), share=True, loss_type="dapo", beta=0.0, iterations=1,
                     mask_truncated=False, precision="fp32")[:2]
    model = _model("llama", {}, "fp32")
    set_attention(model, register_packed_attention("engine_packed_test_whole_batch", whole_batch))
    loss, grads, _, micro = _run(model, share=True, loss_type="dapo", beta=0.0, iterations=1, mask_truncated=False,
                                 precision="fp32")
    assert calls == [] and any(b["packing"].has_trees for b in micro)
    torch.testing.assert_close(loss, reference[0], rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], reference[1][name], rtol=0, atol=0, msg=name)
    _run(model, share=False, loss_type="dapo", beta=0.0, iterations=1, mask_truncated=False, precision="fp32")
    assert calls  # plain batches still go to it


def test_the_batched_short_kernel_gives_no_gradient_where_a_tree_sits():
    """PackedShortAttention handed only some documents (the others are trees, computed by the core):
    its gradient at the other positions is exactly zero, never an empty buffer's leftovers."""
    from engine.speed.cpu_attention import PackedShortAttention, causal_bias

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 16, generator=g).bfloat16().requires_grad_() for h in (4, 2, 2))
    docs = [(0, 40, 24)]                                 # positions 0..39: a tree's, not this kernel's
    out = PackedShortAttention.apply(q, k, v, 0.25, docs, {24: causal_bias(24, 2, torch.bfloat16, "cpu")}, [])
    out[0, 40:].float().sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad[0, :, :40], torch.zeros_like(t.grad[0, :, :40]))
        assert t.grad[0, :, 40:].abs().sum() > 0
