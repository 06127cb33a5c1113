"""GRPO's memory: the rollout (generation on a KV cache) and the training step on the rollout.

One GRPO step has three moments that can set the peak, each on top of the static part (base
weights, LoRA, optimizer state; the LoRA gradients are freed between steps, zero_grad sets them
to None, so generation does not pay for them):

    rollout     N = prompts_per_step x num_generations rows of prompt + completion tokens
                (engine/grpo/rollout.py):
                  KV cache      2 (K, V) x layers x kv_heads x head_dim x bytes x N x (prompt + completion)
                  + prefill     the P prompts' own KV [P, ..., prompt] until it is repeated G times
                                (share_prefill), and the prefill forward's largest intermediate:
                                one block's MLP (gate, up, act(gate), act(gate) * up) or attention
                                (SDPA) over P x prompt tokens, and the [P, 1, prompt, prompt] mask
                  + decoding    the logits [N, V] in fp32 and the sampling's copies of them (sort,
                                indices, softmax, cumulative sum with top-p), and one block's
                                intermediate over the N new tokens
                  + decode copies  speed switch rollout_merge (engine/layers/decode_merge.py): every
                                LoRA-targeted float weight merged once per rollout into a copy
                                W + s*B@A in the base dtype, held for the whole rollout (a 4-bit
                                base keeps its LoRA branch, no copy, unless rollout_dequantize:
                                then a copy W_hat + s*B@A in the dtype it was quantized from);
                                with rollout_lean_decode (engine/model/lean_decode.py) instead its
                                own copies: every block linear (targeted or not; a 4-bit one only
                                when dequantized) in the compute dtype, and the lm_head's where it
                                is transposed (a CPU) or cast (a compute dtype not the base's)
    reference   beta > 0 (the k3 KL to the base) or num_iterations > 1 (the old policy's
                log-probs): a no-grad forward over each micro-batch's packed rows before the step:
                one block's largest intermediate + a chunk of fp32 logits ([C, V], C <= loss_chunk_size)
    training    the SFT step (`predict_for`) over packed rows of data.max_seq_len tokens,
                train.micro_batch_size rows per forward, or fewer when the whole rollout fills fewer
                rows (`training_rows`): share_prompt packs each group as one tree document of
                prompt + G completions (P x (prompt + G x completion) tokens, engine/grpo/batches.py),
                otherwise each completion is its own prompt + completion document (N x (prompt + completion))

The rollout's terms are the byte counts of the tensors `generate_rollouts` makes (the KV buffers
exactly; the transients as estimated above, checked against a live-bytes measurement on CPU in
tests/plan/test_plan_grpo.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.plan.prediction import Breakdown, predict_for
from engine.plan.shapes import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, DTYPE_BYTES, GIB, PlanError, model_shape,
                                resolve_targets)

SAMPLING_BYTES_PER_LOGIT = {"greedy": 4 + 8, "sample": 4 + 4 + 4 + 8, "top_p": 4 + 4 + 4 + 8 + 4 + 4 + 1 + 1}
"""Bytes per [N, V] logit the decoding step holds at its fullest: the fp32 logits and their
argmax (greedy); + scores / temperature, the softmax and the draw's fp64 cumulative sum (or
multinomial's workspace) (sampling); + the sorted scores, their int64 order, the softmax and
cumulative sum of the sorted scores and two bool masks (top-p / top-k)."""


@dataclass
class GRPOBreakdown:
    """Predicted bytes of one GRPO step by moment (see the module docstring); total is the largest
    moment's, with allocator slack and CUDA context as `predict` adds them."""
    rows: int = 0
    prompt_len: int = 0
    completion_len: int = 0
    kv_cache: int = 0
    prefill_kv: int = 0
    prefill_transient: int = 0
    decode_transient: int = 0
    decode_weights: int = 0
    reference_transient: int = 0
    static: int = 0
    rollout: int = 0
    reference: int = 0
    training_total: int = 0
    allocator_slack: int = 0
    cuda_context: int = 0
    total: int = 0
    peak_phase: str = ""
    training: dict = field(default_factory=dict)

    @property
    def rollout_dynamic(self) -> int:
        return self.kv_cache + max(self.prefill_kv + self.prefill_transient, self.decode_transient)

    def as_dict(self) -> dict:
        return {**asdict(self), "rollout_dynamic": self.rollout_dynamic}


def training_rows(prompts: int, num_generations: int, prompt_len: int, completion_len: int, seq_len: int, *,
                  share_prompt: bool) -> int:
    """At most how many packed rows of seq_len tokens one rollout's training documents fill
    (engine/grpo/batches.py): no more rows than documents, and best-fit packing leaves at most one
    row half empty, so rows <= 2 tokens / seq_len + 1. Shared: a group is one tree document, or
    several when prompt + G completions outgrow a row (each part holds the prompt again)."""
    if share_prompt and num_generations > 1:
        per_part = max(1, (seq_len - prompt_len) // completion_len)
        parts = -(-num_generations // per_part)
        docs, tokens = prompts * parts, prompts * (parts * prompt_len + num_generations * completion_len)
    else:
        docs = prompts * num_generations
        tokens = docs * (prompt_len + completion_len)
    return max(1, min(docs, 2 * tokens // seq_len + 1))


def kv_cache_bytes(model_config, rows: int, tokens: int, kv_bytes: int) -> int:
    """The rollout's preallocated KV cache: keys and values of every layer for rows x tokens positions."""
    s = model_shape(model_config)
    return 2 * s.layers * s.kv_heads * s.head_dim * kv_bytes * rows * tokens


def _forward_transient(shape, tokens: int, a: int, rs: int) -> int:
    """The largest moment of one no-grad block over `tokens` tokens (SDPA: no [T, T] scores): the
    residual, its normed copy and the block's output, plus the MLP's gate, up, act(gate) and
    act(gate) * up, or attention's q, K and V repeated to the query heads, and its output."""
    mlp = 4 * shape.intermediate * a
    attention = 4 * shape.heads * shape.head_dim * a
    return tokens * (3 * shape.hidden * rs + max(mlp, attention))


def predict_grpo(model_config, *, prompts_per_step: int, num_generations: int, max_completion_length: int,
                 seq_len: int, micro_batch: int, prompt_len: int | None = None, beta: float = 0.0,
                 num_iterations: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 share_prefill: bool = True, share_prompt: bool = True, rollout_merge: bool = True,
                 rollout_dequantize: bool = False, rollout_lean_decode: bool = False, **settings) -> GRPOBreakdown:
    """Predicted peak of one GRPO step (pure: config numbers in, bytes out).

    seq_len: data.max_seq_len, the packed training rows' length; a prompt holds at most
    seq_len - max_completion_length tokens (engine/grpo/data.py refuses longer ones), the planned
    prompt length unless `prompt_len` says less. settings: `predict`'s keywords (plan_settings)."""
    for name, value, low in (("objective.prompts_per_step", prompts_per_step, 1),
                             ("objective.num_generations", num_generations, 1),
                             ("objective.max_completion_length", max_completion_length, 1)):
        if not isinstance(value, int) or value < low:
            raise PlanError(f"{name}: must be an integer >= {low}, got {value!r}")
    longest_prompt = seq_len - max_completion_length
    if longest_prompt < 1:
        raise PlanError(f"data.max_seq_len={seq_len} leaves no room for a prompt beside "
                        f"objective.max_completion_length={max_completion_length}")
    T = longest_prompt if prompt_len is None else min(prompt_len, longest_prompt)
    L, P = max_completion_length, prompts_per_step
    N = P * num_generations
    cuda = settings.get("cuda", True)
    training_micro = min(micro_batch, training_rows(P, num_generations, T, L, seq_len, share_prompt=share_prompt))
    training = predict_for(model_config, seq_len, training_micro, **settings)
    shape = model_shape(model_config)
    a = DTYPE_BYTES[settings.get("precision", "fp16")]
    rs = DTYPE_BYTES[settings.get("base_dtype") or settings.get("precision", "fp16")]
    out = GRPOBreakdown(rows=N, prompt_len=T, completion_len=L, training=training.as_dict(),
                        training_total=training.total)
    out.static = training.static - training.lora_grads
    out.kv_cache = kv_cache_bytes(model_config, N, T + L, a)
    prefill_rows = P if share_prefill and num_generations > 1 else N
    out.prefill_kv = kv_cache_bytes(model_config, P, T, a) if prefill_rows < N else 0
    # the prefill: one block's largest intermediate, the padding mask [rows, 1, T, T] (bool), the
    # last position's logits
    out.prefill_transient = (_forward_transient(shape, prefill_rows * T, a, rs) + prefill_rows * T * T
                             + prefill_rows * shape.vocab * 4)
    sampling = ("greedy" if temperature == 0 else "top_p" if top_p < 1.0
                else "sample" if not top_k else "top_p")   # top-k alone: topk values ~ a sort's
    # (one query per row: transformers' SDPA folds the query heads onto the KV heads, no K/V copy)
    out.decode_transient = N * shape.vocab * SAMPLING_BYTES_PER_LOGIT[sampling] + _forward_transient(shape, N, a, rs)
    float_base = settings.get("method", "qlora") == "lora" or rollout_dequantize
    if rollout_lean_decode:
        out.decode_weights = lean_copy_bytes_planned(shape, a, rs, blocks=rollout_merge and float_base, cpu=not cuda)
    elif rollout_merge and float_base:
        out.decode_weights = decode_copy_bytes_planned(shape, settings.get("targets", "all-linear"), rs)
    out.rollout = out.static + out.decode_weights + out.rollout_dynamic
    if beta > 0 or num_iterations > 1:
        chunk = min(settings.get("loss_chunk_size", 1024), training_micro * seq_len)
        out.reference_transient = (_forward_transient(shape, training_micro * seq_len, a, rs)
                                   + chunk * shape.vocab * (4 + (2 if a == 2 else 0)))
        out.reference = out.static + out.reference_transient
    training_allocated = training.static + training.dynamic
    moments = {"rollout": out.rollout, "reference forward": out.reference, "training step": training_allocated}
    out.peak_phase = max(moments, key=moments.get)
    allocated = moments[out.peak_phase]
    if cuda:
        out.allocator_slack = int(ALLOCATOR_SLACK * allocated)
        out.cuda_context = CUDA_CONTEXT_BYTES
    out.total = allocated + out.allocator_slack + out.cuda_context
    return out


def decode_copy_bytes_planned(shape, targets, weight_bytes: int) -> int:
    """The rollout's merged LoRA decode copies: every targeted linear's [out, in] weight once, in
    the base dtype (as `engine.layers.decode_merge.decode_copy_bytes` counts a built model)."""
    per_layer, head = resolve_targets(shape, targets)
    sizes = {name: fin * fout for name, fin, fout, _ in shape.linears}
    return weight_bytes * (sum(sizes[n] for layer in per_layer for n in layer)
                           + (shape.vocab * shape.hidden if head else 0))


def lean_copy_bytes_planned(shape, copy_bytes: int, base_bytes: int, *, blocks: bool, cpu: bool) -> int:
    """The lean decode step's copies (engine/model/lean_decode.py): every block linear in the compute
    dtype when the blocks are copied (merged LoRA on a float base), and the lm_head's where the CPU's
    in_out layout transposes it or the compute dtype is not the base's."""
    block = shape.layers * sum(fin * fout for _, fin, fout, _ in shape.linears) if blocks else 0
    head = shape.vocab * shape.hidden if cpu or copy_bytes != base_bytes else 0
    return copy_bytes * (block + head)


def grpo_plan_args(objective) -> dict | None:
    """predict_grpo's GRPO keywords from an objective config (engine/config.py ObjectiveConfig:
    name grpo, prompts_per_step, num_generations, max_completion_length, beta, num_iterations,
    temperature, top_p, top_k, share_prompt); None for another objective."""
    if getattr(objective, "name", "sft") != "grpo":
        return None
    keys = ("prompts_per_step", "num_generations", "max_completion_length", "beta", "num_iterations",
            "temperature", "top_p", "top_k")
    missing = [k for k in keys if not hasattr(objective, k)]
    if missing:
        raise PlanError(f"objective=grpo: the objective config lacks {missing}")
    return {**{k: getattr(objective, k) for k in keys}, "share_prompt": getattr(objective, "share_prompt", True)}


def format_grpo(b: GRPOBreakdown, budget: int, prompts_per_step: int) -> str:
    """The GRPO table `python -m engine.plan objective=grpo` prints under the training step's."""
    def g(n: int) -> str:
        return f"{n / GIB:.2f}"

    training = b.training["total"] - b.training["allocator_slack"] - b.training["cuda_context"]
    rows = [("rollout: KV cache", b.kv_cache,
             f"{b.rows} rows x ({b.prompt_len} prompt + {b.completion_len} completion) tokens"),
            ("rollout: the prompts' KV before its G copies", b.prefill_kv, f"{prompts_per_step} rows (share_prefill)"),
            ("rollout: prefill transient", b.prefill_transient, "one block's intermediate, mask, last logits"),
            ("rollout: decoding transient", b.decode_transient, "logits [rows, vocab] fp32 + sampling"),
            ("rollout: merged LoRA decode copies", b.decode_weights, "W + s*B@A per targeted weight (rollout_merge)"),
            ("static without LoRA grads", b.static, "weights, LoRA, optimizer state"),
            ("**rollout**", b.rollout, "static + decode copies + KV + the larger transient"),
            ("**reference / old log-probs forward**", b.reference, "beta > 0 or num_iterations > 1"),
            ("**training step**", training, "the table above, before slack and context")]
    lines = ["", f"GRPO: {prompts_per_step} prompts x {b.rows // prompts_per_step} completions per step, prompts of "
             f"up to {b.prompt_len} tokens, completions of up to {b.completion_len}", "",
             f"| {'GRPO moment / component':<46} | GiB    | what |", f"|{'-' * 48}|--------|------|"]
    lines += [f"| {name:<46} | {g(n):>6} | {what} |" for name, n, what in rows if n]
    verdict = "fits" if b.total <= budget else "does NOT fit"
    lines += ["", f"GRPO step peak: {g(b.total)} GiB (the {b.peak_phase}, with slack and context): "
              f"{verdict} in the budget of {g(budget)} GiB"]
    return "\n".join(lines)
