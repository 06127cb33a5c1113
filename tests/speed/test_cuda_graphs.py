"""engine/speed/cuda_graphs.py: each micro-batch padded into a shape bucket's static buffers, the
bucket's forward + backward captured once and replayed. On a CPU the same code runs in "eager
replay" mode (the captured function run eagerly): bucketing, padding, buffers, gradient accumulation
and the fallbacks are checked here; the real capture against eager in the `gpu`-marked test."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from engine.config import SpeedConfig
from engine.data.loader import Loader
from engine.layers.inject import inject_lora
from engine.layers.lora import lora_modules, mark_only_lora_trainable
from engine.model.packing import PackingContext
from engine.speed import cuda_attention, cuda_graphs
from engine.speed import plan as speed_plan
from engine.speed.cuda_graphs import BucketKey, GraphedForwardBackward, bucket_key, bucket_length
from engine.training import amp
from engine.training.loss import lm_head_loss
from engine.training.objective import CausalLM
from engine.training.optim import build_optimizer
from engine.training.step import forward_backward, train_step
from tests.conftest import apply_speed, assert_close_reduced, make_tiny_model
from tests.e2e.test_train import workdir  # noqa: F401  (a fixture: the tiny model dir and chat data)

CPU = torch.device("cpu")
LENGTHS = [23, 9, 17, 30, 5, 12, 26, 8, 19, 14, 21, 7]   # packed into rows of <= 48 tokens
T_B = 128                                                  # their bucket length


def _docs(vocab: int, lengths=LENGTHS, seed: int = 0, prompt: int = 3) -> list[dict]:
    """Documents as the tokenizer stage makes them: labels shifted, a prompt without loss."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        labels = ids[1:] + [-100]
        labels[:prompt] = [-100] * min(prompt, n)
        docs.append({"input_ids": ids, "labels": labels})
    return docs


def _batches(vocab: int, lengths=LENGTHS, rows: int = 2, max_len: int = 48, seed: int = 0) -> list[dict]:
    loader = Loader(_docs(vocab, lengths, seed), max_seq_len=max_len, micro_batch_size=rows, packing=True, seed=seed,
                    pad_token_id=0, shuffle=False)
    return list(loader.one_pass())


def _lora_model(family: str = "llama", **overrides):
    """A tiny model with LoRA on every linear (B != 0), SDPA attention (a plan then swaps in its
    packed attention; eager would stay), no speed plan yet."""
    model, _ = make_tiny_model(family, **overrides)
    model.set_attn_implementation("sdpa")
    inject_lora(model, "all-linear", 4, 8.0)
    mark_only_lora_trainable(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model


def _model(precision: str = "fp32", family: str = "llama", **overrides):
    """`_lora_model` with the CPU's speed plan applied, in training mode, and its objective."""
    model = _lora_model(family, **overrides)
    kernels = apply_speed(model, precision, off=("compile_norms", "compile_loss"))
    return model.train(), CausalLM(chunk_size=16, kernels=kernels)  # chunks of 16: padding entries span chunks


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _run(fb, model, micro, objective, precision="fp32", scale=1.0):
    count = sum(objective.count(b) for b in micro)
    loss, _ = fb(model, micro, objective=objective, count=count, scale=scale, precision=precision, device=CPU)
    return loss, _grads(model)


def _assert_same(loss, grads, ref_loss, ref_grads, *, terms: int, dtype=torch.float32):
    assert grads.keys() == ref_grads.keys() and grads
    assert_close_reduced(loss, ref_loss, terms=terms, dtype=dtype, msg="loss sum")
    for name in ref_grads:
        assert_close_reduced(grads[name], ref_grads[name], terms=terms, dtype=dtype, msg=name)


# ----------------------------------------------------------------------------- buckets

def test_bucket_lengths_are_multiples_of_128_then_eight_per_octave():
    assert [bucket_length(t) for t in (1, 48, 128, 129, 1000, 1024)] == [128, 128, 128, 256, 1024, 1024]
    assert [bucket_length(t) for t in (1025, 2049, 2600, 4096, 4097, 9000)] == [1152, 2304, 2816, 4096, 4608, 9216]
    for t in range(1, 20000, 97):  # never shorter than the row; above 1k under 1/8 of it padding
        assert t <= bucket_length(t) and (t <= 1024 or bucket_length(t) - t < t / 8)
    assert len({bucket_length(t) for t in range(2049, 4097)}) == 8   # eight buckets per octave


def test_the_key_counts_documents_labels_and_the_attention_path():
    batch = _batches(64)[0]
    packing = batch["packing"]
    B, T = batch["input_ids"].shape
    key, why = bucket_key(batch)
    documents = sum(len(row) for row in packing.doc_lengths) + B     # + one padding document per row
    quantum = B * T_B // 8
    assert why == "" and key == BucketKey(B, T_B, max(8, 1 << (documents - 1).bit_length()),
                                          -(-packing.num_loss_tokens // quantum) * quantum, True, True)
    assert bucket_key(batch, training=False)[0] == dataclasses.replace(key, training=False)
    # rows exactly as long as the bucket with one document each: the single-document path, its own bucket
    ids = torch.randint(1, 64, (2, 256))
    labels = torch.roll(ids, -1, 1)
    from engine.model.packing import packing_context
    single = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(256).expand(2, -1),
              "packing": packing_context(labels, [[256], [256]], num_tokens=512)}
    assert bucket_key(single)[0] == BucketKey(2, 256, 8, 512, False, True)


def test_a_batch_no_bucket_holds_says_why():
    batch = _batches(64)[0]
    assert bucket_key(batch, max_length=32) == (None, "a row longer than 32 tokens")
    assert bucket_key(batch, max_documents=4) == (None, "more than 4 documents in a micro-batch")
    padded = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    assert bucket_key(padded) == (None, "unpacked rows (a padding mask)")
    p = batch["packing"]
    trees = PackingContext(p.doc_lengths, p.label_index, p.label_targets, p.num_tokens, p.num_loss_tokens,
                           trees=[[(1, (row[0] - 1,))] + [None] * (len(row) - 1) for row in p.doc_lengths])
    assert bucket_key({**batch, "packing": trees}) == (None, "tree documents")


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padded_buckets_give_the_unpadded_loss_and_lora_gradients(precision):
    """Rows of <= 48 tokens padded to 128, labels padded to the bucket's count, cu_seqlens to its
    documents: the loss sum and every LoRA gradient equal the eager step's on the same micro-batches
    (two of them: the gradients accumulate outside the graph), to the dtype's rounding."""
    model, objective = _model(precision)
    assert model.config._attn_implementation.startswith("engine_packed")   # the plan's packed attention
    micro = _batches(model.config.vocab_size)[:2]
    assert all(b["input_ids"].shape[1] < T_B for b in micro)        # the buckets really pad
    ref_loss, ref_grads = _run(forward_backward, model, micro, objective, precision, scale=3.0)
    graphed = GraphedForwardBackward(capture=False)
    loss, grads = _run(graphed, model, micro, objective, precision, scale=3.0)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    _assert_same(loss, grads, ref_loss, ref_grads, terms=T_B * model.config.hidden_size, dtype=dtype)
    assert sum(graphed.stats.values()) == 2 and not any(k.startswith("eager") for k in graphed.stats)
    for key in graphed.buckets:
        assert key.labels > 0 and key.length == T_B


def test_the_loss_ignores_padding_entries_by_their_mask():
    """lm_head_loss over label_index padded with masked entries (spanning chunks) = over the real ones."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 32, bias=False)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    index, targets = torch.tensor([1, 4, 7, 12, 15]), torch.tensor([3, 9, 1, 30, 2])
    real = PackingContext([[10], [10]], index, targets, 20, 5)
    padded = PackingContext([[10], [10]], torch.cat([index, torch.zeros(6, dtype=torch.long)]),
                            torch.cat([targets, torch.zeros(6, dtype=torch.long)]), 20, 5,
                            label_mask=torch.tensor([1.0] * 5 + [0.0] * 6))
    labels = torch.full((2, 10), -100)
    out = []
    for ctx in (real, padded):
        loss = lm_head_loss(hidden, labels, head, chunk_size=3, packing=ctx)
        g_hidden, g_head = torch.autograd.grad(loss * 2.0, (hidden, head.weight))
        out.append((loss, g_hidden, g_head))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- capture and replay counts

def test_a_new_bucket_is_captured_once_and_later_batches_replay():
    model, objective = _model()
    short = _batches(model.config.vocab_size)                        # rows <= 48 tokens: T_b 128
    long = _batches(model.config.vocab_size, [300] * 4, rows=2, max_len=300)        # T_b 384, alike
    graphed = GraphedForwardBackward(capture=False)
    for batch in short[:3]:
        _run(graphed, model, [batch], objective)
    keys = {bucket_key(b)[0] for b in short[:3]}
    assert graphed.stats["captures"] == len(keys) and graphed.stats["replays"] == 3 - len(keys)
    _run(graphed, model, [long[0]], objective)
    assert graphed.stats["captures"] == len(keys) + 1 and max(k.length for k in graphed.buckets) == 384
    _run(graphed, model, [long[1]], objective)                      # same bucket as long[0]: a replay
    assert bucket_key(long[1])[0] == bucket_key(long[0])[0]
    assert graphed.stats["replays"] == 3 - len(keys) + 1 and graphed.describe().startswith("cuda_graphs: ")
    model.eval()                                                    # dropout off: another capture
    _run(graphed, model, [long[1]], objective)
    assert graphed.stats["captures"] == len(keys) + 2 and {k.training for k in graphed.buckets} == {True, False}


def test_what_no_bucket_holds_runs_eagerly_counted_and_said_once(capsys):
    """A row longer than the largest bucket, more documents than a bucket holds, a bucket past the
    cap, an objective that is not bucketed: the eager step's numbers, each reason counted, said once."""
    model, objective = _model()
    micro = _batches(model.config.vocab_size)[:2]
    ref_loss, ref_grads = _run(forward_backward, model, micro, objective)
    cases = {"a row longer than 32 tokens": GraphedForwardBackward(capture=False, max_length=32),
             "more than 4 documents in a micro-batch": GraphedForwardBackward(capture=False, max_documents=4)}
    for why, graphed in cases.items():
        for _ in range(2):
            loss, grads = _run(graphed, model, micro, objective)
            _assert_same(loss, grads, ref_loss, ref_grads, terms=1)   # the same eager code: equal
        assert graphed.stats == {f"eager: {why}": 4} and not graphed.buckets
        assert capsys.readouterr().err.count(why) == 1
    capped = GraphedForwardBackward(capture=False, max_graphs=1)
    long = _batches(model.config.vocab_size, [300, 280], rows=2, max_len=300)
    _run(capped, model, [micro[0]], objective)
    _run(capped, model, [long[0]], objective)
    assert capped.stats == {"captures": 1, "eager: more than 1 buckets": 1}

    class Pairs(CausalLM):  # a loss the buckets cannot pad (DPO / GRPO say no the same way)
        bucketed = False

    graphed = GraphedForwardBackward(capture=False)
    loss, grads = _run(graphed, model, micro, Pairs(16, objective.kernels))
    _assert_same(loss, grads, ref_loss, ref_grads, terms=1)
    assert graphed.stats == {"eager: objective Pairs is not bucketed": 2}


def test_train_step_takes_the_plans_forward_backward():
    """train_step(forward_backward_fn=...): the same optimizer step as the eager one."""
    results = []
    for graphed in (None, GraphedForwardBackward(capture=False)):
        model, objective = _model()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        from engine.config import OptimConfig
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
        micro = _batches(model.config.vocab_size)[:2]
        result = train_step(model, micro, objective=objective, params=params, optimizer=optimizer, scheduler=None,
                            scaler=amp.DynamicLossScaler(enabled=False, device=CPU), precision="fp32", device=CPU,
                            max_grad_norm=1.0, forward_backward_fn=graphed)
        results.append((result.loss_sum, result.grad_norm, {n: p.detach().clone() for n, p in params}))
    (loss, norm, after), (g_loss, g_norm, g_after) = results
    assert_close_reduced(g_loss, loss, terms=T_B * 64)
    assert_close_reduced(g_norm, norm, terms=T_B * 64)
    for name in after:
        torch.testing.assert_close(g_after[name], after[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_gpu_attention_path_sees_the_bucket_and_computes_the_same(monkeypatch):
    """With the flash varlen kernel (its op replaced by a checking reference, as tests/speed/
    test_varlen_attention.py does): each call gets the bucket's cu_seqlens (D_b + 1 entries, zero-length
    documents at the end) and max_seqlen = T_b, and the step equals the eager one."""
    from torch.nn.attention import varlen

    from engine.model.attention import register_packed_attention, set_attention
    from tests.speed.test_varlen_attention import reference_varlen

    model, objective = _model()
    name = register_packed_attention("engine_packed_test_graphs",
                                     cuda_attention.flash_varlen_kernel(dtypes=(torch.float32,)))
    set_attention(model, name)
    seen = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen.append((cu_q.numel(), max_q, q.shape[0]))
        return reference_varlen(q, k, v, cu_q, scale=scale)

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    micro = _batches(model.config.vocab_size)[:1]
    ref_loss, ref_grads = _run(forward_backward, model, micro, objective)
    seen.clear()
    graphed = GraphedForwardBackward(capture=False)
    loss, grads = _run(graphed, model, micro, objective)
    _assert_same(loss, grads, ref_loss, ref_grads, terms=T_B * model.config.hidden_size)
    (key,) = graphed.buckets
    assert set(seen) == {(key.documents + 1, T_B, key.rows * T_B)}


# ----------------------------------------------------------------------------- the capture path, CUDA faked

class FakeCuda:
    """torch.cuda's stream and graph calls as `_capture` makes them, on a CPU: the warm-ups and the
    captured run execute eagerly, a replay only counts (so only a bucket's first micro-batch, computed
    by its capture, has its numbers); `fail` makes entering the capture raise, as an op that cannot be
    captured does."""

    def __init__(self, monkeypatch, fail: str = ""):
        self.fail, self.debug_mode, self.replays, self.captures, self.invalidated = fail, 1, 0, 0, 0
        self.events: list[str] = []
        fake = self

        class Stream:
            def __init__(self, *a, **k): ...

            def wait_stream(self, other): fake.events.append("wait")

        class Graph:
            def replay(self): fake.replays += 1

        class Capture:
            def __init__(self, graph, pool=None): ...

            def __enter__(self):
                fake.events.append("capture")
                if fake.fail:
                    raise RuntimeError(fake.fail)

            def __exit__(self, *exc): fake.captures += 1

        def invalidate():
            fake.invalidated += 1
            fake.events.append("invalidate")

        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: self.debug_mode)
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: setattr(self, "debug_mode", mode))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(cuda_graphs, "invalidate_factor_caches", invalidate)


def test_capture_warms_up_invalidates_the_lora_caches_then_captures_and_replays(monkeypatch):
    model, objective = _model()
    fake = FakeCuda(monkeypatch)
    calls = []
    real_run = GraphedForwardBackward._run
    monkeypatch.setattr(GraphedForwardBackward, "_run", lambda self, *a: calls.append(1) or real_run(self, *a))
    short = _batches(model.config.vocab_size)
    long = _batches(model.config.vocab_size, [300] * 4, rows=2, max_len=300)
    graphed = GraphedForwardBackward(capture=True)
    ref = _run(forward_backward, model, [short[0]], objective)
    got = _run(graphed, model, [short[0]], objective)          # captured: its numbers come from the capture
    _assert_same(*got, *ref, terms=T_B * model.config.hidden_size)
    assert len(calls) == cuda_graphs.WARMUP_ITERS + 1 and fake.replays == 1 and fake.captures == 1
    assert fake.events[-2:] == ["invalidate", "capture"] and fake.debug_mode == 1   # restored after the capture
    calls.clear()
    _run(graphed, model, [long[0]], objective)                  # a later bucket warms up once
    assert len(calls) == 2 and fake.captures == 2 and fake.invalidated == 2
    _run(graphed, model, [long[0]], objective)   # its bucket again, a later step: the replay checked once
    assert len(calls) == 3 and fake.replays == 3 and graphed.stats == {"captures": 2, "replays": 1}
    _run(graphed, model, [long[0]], objective)                  # checked already: no Python run
    assert len(calls) == 3 and fake.replays == 4 and graphed.stats == {"captures": 2, "replays": 2}
    assert not graphed.broken and not graphed.verify


def test_a_replay_that_disagrees_with_the_eager_step_leaves_the_run_eager(monkeypatch, capsys):
    """The fake replay recomputes nothing, so a later step's replay of another micro-batch of the same
    bucket returns the captured batch's numbers (as a graph that missed a change would): the check
    sees it, the micro-batch takes the eager numbers, and the run goes on eagerly, counted."""
    model, objective = _model()
    FakeCuda(monkeypatch)
    long = _batches(model.config.vocab_size, [300] * 4, rows=2, max_len=300)
    assert bucket_key(long[0]) == bucket_key(long[1]) and not torch.equal(long[0]["input_ids"], long[1]["input_ids"])
    graphed = GraphedForwardBackward(capture=True)
    _run(graphed, model, [long[0]], objective)
    for _ in range(2):
        _assert_same(*_run(graphed, model, [long[1]], objective), *_run(forward_backward, model, [long[1]], objective),
                     terms=1)
    (why,) = [k for k in graphed.stats if k.startswith("eager")]
    assert why.startswith("eager: a replay disagreed with the eager step after an optimizer step (loss ")
    assert graphed.stats == {"captures": 1, why: 2} and capsys.readouterr().err.count("a replay disagreed") == 1


def test_a_failed_capture_leaves_the_run_eager_counted_and_said_once(monkeypatch, capsys):
    model, objective = _model()
    fake = FakeCuda(monkeypatch, fail="operation not permitted when stream is capturing")
    micro = _batches(model.config.vocab_size)[:2]
    ref = _run(forward_backward, model, micro, objective)
    graphed = GraphedForwardBackward(capture=True)
    for _ in range(2):
        _assert_same(*_run(graphed, model, micro, objective), *ref, terms=1)   # the eager step's numbers
    why = "eager: capture failed (RuntimeError: operation not permitted when stream is capturing)"
    assert graphed.stats == {why: 4} and not graphed.buckets and fake.replays == 0
    assert fake.debug_mode == 1 and capsys.readouterr().err.count("capture failed") == 1


# ----------------------------------------------------------------------------- the plan

def _gpu(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(cuda_attention, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(cuda_attention, "torch_attention_features", lambda: cuda_attention.TorchAttention(True, True))
    return torch.device("cuda")


def test_auto_turns_cuda_graphs_on_where_it_can_capture_and_says_why_not(monkeypatch):
    cuda = _gpu(monkeypatch)
    on = speed_plan.resolve(SpeedConfig(), device=cuda, precision="bf16")
    assert on.cuda_graphs and "cuda_graphs" in on.describe() and "cuda_graphs off" not in on.describe()
    assert not speed_plan.resolve(SpeedConfig(), device=CPU, precision="bf16").cuda_graphs
    cases = {"FSDP gathers": dict(fsdp=True), "offload_activations": dict(offload_activations=True),
             "fp16: the fp16 guard": dict(precision="fp16"), "objective dpo": dict(objective="dpo"),
             "objective grpo": dict(objective="grpo")}
    for why, kwargs in cases.items():
        plan = speed_plan.resolve(SpeedConfig(), device=cuda, **{"precision": "bf16", **kwargs})
        assert not plan.cuda_graphs and f"cuda_graphs off: {why}" in plan.describe(), why
    fp32 = speed_plan.resolve(SpeedConfig(), device=cuda, precision="fp32")      # no flash varlen in fp32
    assert not fp32.cuda_graphs and "cuda_graphs off: needs flash varlen attention" in fp32.describe()
    disabled = speed_plan.resolve(SpeedConfig(disable=["cuda_graphs"]), device=cuda, precision="bf16")
    assert not disabled.cuda_graphs and "cuda_graphs" not in disabled.describe()
    SpeedConfig(disable=["cuda_graphs"]).validate()
    assert not speed_plan.resolve(SpeedConfig(mode="off"), device=cuda, precision="bf16").cuda_graphs


def test_apply_hands_the_graphs_to_the_step_and_refuses_softcapping(monkeypatch, capsys):
    cuda = _gpu(monkeypatch)
    plan = speed_plan.resolve(SpeedConfig(), device=cuda, precision="bf16")
    model, _ = make_tiny_model("llama")
    inject_lora(model, "all-linear", 4, 8.0)
    kernels = speed_plan.apply(plan, model)      # the model stays on the CPU: apply only swaps
    assert isinstance(kernels.forward_backward, GraphedForwardBackward)
    assert speed_plan.apply(plan.off("cuda_graphs"), model).forward_backward is None
    gemma, _ = make_tiny_model("gemma2")
    assert gemma.config.attn_logit_softcapping
    assert speed_plan.apply(plan, gemma).forward_backward is None
    assert "cuda_graphs off: attention logit softcapping" in capsys.readouterr().err
    assert dataclasses.replace(plan, cuda_graphs=False).off().cuda_graphs is False


# ----------------------------------------------------------------------------- a real GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_replays_equal_eager_steps_on_a_gpu():
    """bf16, LoRA on every linear (B != 0), activation checkpointing, the GPU's plan (flash varlen):
    at each of 4 optimizer steps the replayed micro-batches give the eager step's loss and LoRA
    gradients (relative error of the whole gradient within a few bf16 epsilons), and the optimizer
    then moves the adapters far (lr 0.1): a graph still reading the captured step's LoRA factors
    would be off by tens of percent."""
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16 (its plan keeps CUDA graphs off)")
    from engine.config import OptimConfig
    from engine.model.build import enable_activation_checkpointing

    cuda = torch.device("cuda")
    model = _lora_model().to(cuda).train()  # the plan then swaps in flash varlen
    enable_activation_checkpointing(model)
    plan = speed_plan.resolve(SpeedConfig(retain_host_memory=False), device=cuda, precision="bf16")
    kernels = speed_plan.apply(plan, model)
    assert plan.varlen_attention == "flash_varlen" and isinstance(kernels.forward_backward, GraphedForwardBackward)
    graphed, objective = kernels.forward_backward, CausalLM(16, kernels)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1))
    batches = _batches(model.config.vocab_size, LENGTHS * 3)   # 7 micro-batches
    for step in range(4):
        micro = [batches[(2 * step) % len(batches)], batches[(2 * step + 1) % len(batches)]]
        count = sum(objective.count(b) for b in micro)
        results = []
        for fb in (forward_backward, graphed):
            loss, _ = fb(model, micro, objective=objective, count=count, scale=1.0, precision="bf16", device=cuda)
            results.append((loss.float(), _grads(model)))
        (ref_loss, ref), (loss, got) = results
        assert got.keys() == ref.keys() and got
        assert abs(loss.item() - ref_loss.item()) <= 4 * 2 ** -8 * abs(ref_loss.item()), step
        diff = torch.sqrt(sum(((got[n] - ref[n]).float() ** 2).sum() for n in ref))
        norm = torch.sqrt(sum((ref[n].float() ** 2).sum() for n in ref))
        assert diff <= 4 * 2 ** -8 * norm, (step, diff.item(), norm.item())   # bf16: eps = 2^-8
        for n, p in model.named_parameters():  # the eager gradients take the step
            if n in ref:
                p.grad = ref[n]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stats = graphed.stats
    assert stats["captures"] >= 1 and stats["replays"] >= 1 and not any(k.startswith("eager") for k in stats), stats
    assert not graphed.verify   # the once-per-run replay check ran (and agreed)


# ----------------------------------------------------------------------------- the training loop

def test_a_training_run_takes_the_plans_graphs_and_logs_the_eager_losses(workdir, monkeypatch, capsys):
    """engine.train hands StepKernels.forward_backward to every train_step: a run whose plan carries the
    graphed step (eager replay here) replays its buckets and logs the eager run's losses (fp32)."""
    from engine import speed
    from engine import train as train_mod
    from tests.e2e.test_train import losses, make_cfg

    train_mod.run_training(make_cfg(workdir, "graphs_eager", train={"max_steps": 3}))
    graphed = GraphedForwardBackward(capture=False)
    real_apply = speed_plan.apply

    def apply(plan, model):
        return dataclasses.replace(real_apply(plan, model), forward_backward=graphed)

    monkeypatch.setattr(speed_plan, "apply", apply)
    monkeypatch.setattr(speed, "apply", apply)
    train_mod.run_training(make_cfg(workdir, "graphs_on", train={"max_steps": 3}))
    root = workdir[0]
    assert graphed.stats["captures"] + graphed.stats["replays"] == 3 * 2     # 3 steps x grad_accum 2
    assert not any(k.startswith("eager") for k in graphed.stats) and graphed.stats["replays"] > 0
    assert f"cuda_graphs: {graphed.stats['captures']} captures, {graphed.stats['replays']} replays" \
        in capsys.readouterr().err                                    # said at the end of the run
    on, off = losses(root / "graphs_on"), losses(root / "graphs_eager")
    assert on.keys() == off.keys() == {1, 2, 3}
    for step in off:
        assert abs(on[step] - off[step]) <= 1e-5 * abs(off[step]), (step, on[step], off[step])


def test_the_label_mask_travels_with_the_packing_context():
    p = _batches(64)[0]["packing"]
    masked = PackingContext(p.doc_lengths, p.label_index, p.label_targets, p.num_tokens, p.num_loss_tokens,
                            label_mask=torch.ones(p.label_index.numel()))
    assert masked.to("cpu") is masked and masked.to("meta").label_mask.device.type == "meta"
    assert p.to("meta").label_mask is None                     # a loader's context: every entry real


def test_a_micro_batch_without_labels_adds_nothing_through_its_bucket():
    """Every label entry of the bucket is padding (mask 0): loss 0, gradients 0, next to one with labels."""
    model, objective = _model()
    vocab = model.config.vocab_size
    loader = Loader(_docs(vocab, LENGTHS, prompt=64), max_seq_len=48, micro_batch_size=2, packing=True, seed=0,
                    pad_token_id=0, shuffle=False)
    empty = next(iter(loader.one_pass()))
    assert empty["num_loss_tokens"] == 0 and bucket_key(empty)[0].labels > 0
    micro = [empty, _batches(vocab)[1]]
    ref_loss, ref_grads = _run(forward_backward, model, micro, objective)
    loss, grads = _run(GraphedForwardBackward(capture=False), model, micro, objective)
    _assert_same(loss, grads, ref_loss, ref_grads, terms=T_B * model.config.hidden_size)
    alone, _ = GraphedForwardBackward(capture=False)(model, [empty], objective=objective, count=1, scale=1.0,
                                                     precision="fp32", device=CPU)   # a rank's count clamped to 1
    zero = _grads(model)
    assert alone.item() == 0.0 and zero and all(g.abs().max() == 0 for g in zero.values())
