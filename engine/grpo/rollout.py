"""GRPO rollouts: G completions per prompt from the model as it trains (LoRA active), on a preallocated KV cache.

    rollouts = generate_rollouts(model, prompts, num_generations=G, max_new_tokens=L, temperature=1.0,
                                 stop_token_ids=[eos, end_of_turn], pad_token_id=pad, generator=g)
    rollouts.completion_ids[p * G + g]   # prompt p's g-th completion, cut after its stop token
    rollouts.truncated[p * G + g]        # no stop token within L tokens

The prompts are left-padded to one length T, so every row's next token sits in the same column
and all rows decode together:

    prefill   the P prompts once: ids [P, T], positions cumsum(mask) - 1      -> KV [P, H, T, D] per layer
    share     each prompt's KV repeated G times (prompt-major, as TRL orders)   -> KV [P*G, H, T, D]
              (switch share_prefill: the prompt is not recomputed G times)
    decode    one token per row per step, L steps at most, into the preallocated KV [P*G, H, T + L, D];
              the logits of the last position only, sampled on the device; a row that has emitted a
              stop token emits pad from then on (its tokens are masked out of the result)
    stop      every `check_every` steps the rows' stopped flags are read from the device (N bools):
              all stopped ends the loop; once most have stopped, the rest continue alone
              (switch compact_rows: their KV rows are copied out, the stopped rows no longer computed)

Nothing else crosses from the device to the host until the end, where the generated ids [P*G, steps]
and the stopped flags come back in one read each.

Sampling follows transformers' `generate` (and so TRL's GRPOTrainer): logits / temperature, then
top-k (0: off), then top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
the smallest set whose probability reaches top_p), then softmax and a draw: by default one uniform
per row through the cumulative distribution (switch sampler; "multinomial" is transformers' own
`torch.multinomial`, token for token); greedy (temperature 0) is the argmax. Draws come from
`generator` (so a resumed run draws the same tokens) or torch's global RNG when it is None.

The model is transformers' model with the engine's LoRA layers inside; its own forward runs with
`RolloutCache`, a transformers `Cache` whose layers write into preallocated buffers and hand the
attention the filled prefix, exactly what a growing `DynamicCache` hands it (so the masks
transformers builds, and the engine's packed attention, see the same shapes). Any family whose
forward takes a transformers cache works: sliding windows are applied by the mask over the full
prefix, not by dropping old keys.

Per decode step the cost is the weights' GEMMs at a few rows (bandwidth-bound: SmolLM2-135M reads
its ~540 MB of fp32 weights every token), plus ~3,000 small aten ops of transformers' blocks. The
LoRA branch alone was ~1,500 more (A's matmul, B's addmm, views, per projection): with `merge_lora` each
adapted layer decodes on a merged copy W + s*B@A built once per rollout (engine/layers/decode_merge.py),
one GEMM per layer; the model's own weights are not touched. With `lean_decode` the prefill still
runs the model's forward, and every decode step runs `LeanDecoder.step` (engine/model/lean_decode.py)
on the same cache: ~1,150 ops per SmolLM2 token instead of ~3,000, q/k/v and gate/up one GEMM
each on copies concatenated per group (its own merged copies: `lora_merged_for_decode` is then not
entered). Which step ran, and why, is `Rollouts.decode` (GRPO prints it at its first rollout).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
from transformers.cache_utils import Cache, DynamicLayer

from engine.layers.decode_merge import LAYOUTS, lora_merged_for_decode
from engine.model.lean_decode import CHECK_TOLERANCE, LeanDecoder, NotRecognised, default_layout, layouts


COMPACT_BELOW = 0.75
"""compact_rows: a stop check that finds at most this share of the decoding rows still running
drops the others (a copy of the live rows' KV: worth it only when it frees a good part of the batch)."""


class RolloutError(ValueError):
    """Bad rollout arguments (empty prompt, no stop token, a negative temperature); the message says which."""


@dataclass
class Rollouts:
    """What `generate_rollouts` returns; row i is prompt i // G's (i % G)-th completion."""

    completion_ids: list[list[int]]
    """N = len(prompts) * G rows, each cut after its first stop token (kept) or at max_new_tokens."""
    truncated: list[bool]
    """True where no stop token came within max_new_tokens."""
    tokens: torch.Tensor | None = field(default=None, repr=False)
    """[N, steps] the generated ids on the model's device, pad after a row's stop token (steps <=
    max_new_tokens: fewer when every row stopped early)."""
    decode: str = ""
    """Which decode step ran: the lean step (engine/model/lean_decode.py) or transformers' forward, and why."""


# ----------------------------------------------------------------------------- the KV cache

class PreallocatedLayer(DynamicLayer):
    """One decoder layer's keys and values in buffers [B, H_kv, capacity, D] allocated at the first
    update; `update` copies the new positions in and returns the filled prefix [B, H_kv, length, D]
    (a view, no copy), as `DynamicLayer`'s torch.cat would, without re-allocating every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        B, H, _, _ = key_states.shape
        self._k = key_states.new_empty(B, H, self.capacity, key_states.shape[-1])
        self._v = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"rollout KV cache full: {self.length} + {n} > {self.capacity} positions")
        self._k[:, :, self.length:self.length + n].copy_(key_states)
        self._v[:, :, self.length:self.length + n].copy_(value_states)
        self.length += n
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (a device tensor of row numbers) in fresh, smaller buffers."""
        if self.is_initialized:
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def get_max_length(self) -> int:
        return self.capacity

    def to_dtype(self, dtype: torch.dtype) -> None:
        """The buffers in `dtype` (under autocast transformers caches rotated keys in fp32; the lean
        step's attention reads them in the compute dtype, as autocast's SDPA would cast them)."""
        if self.is_initialized and (self._k.dtype != dtype or self._v.dtype != dtype):
            self._k, self._v = self._k.to(dtype), self._v.to(dtype)
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def repeat_rows(self, repeats: int, capacity: int) -> None:
        """Each row repeated `repeats` times (row-major: row 0's copies first) into fresh buffers of
        `capacity` positions; the filled prefix is copied, the rest left to be written."""
        if not self.is_initialized:
            return
        B, H, _, D = self._k.shape
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(B * repeats, H, capacity, old.shape[-1])
            new[:, :, :self.length].copy_(old[:, :, :self.length].repeat_interleave(repeats, dim=0))
            setattr(self, name, new)
        self.capacity = capacity
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


class RolloutCache(Cache):
    """A transformers `Cache` of `PreallocatedLayer`s, one per decoder layer."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])

    def repeat_rows(self, repeats: int, capacity: int) -> None:
        for layer in self.layers:
            layer.repeat_rows(repeats, capacity)

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(index)

    def to_dtype(self, dtype: torch.dtype) -> None:
        for layer in self.layers:
            layer.to_dtype(dtype)


# ----------------------------------------------------------------------------- sampling

def next_tokens(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None, sampler: str = "inverse_cdf") -> torch.Tensor:
    """logits [N, V] (fp32) -> token ids [N], as transformers' generate picks them (see the module
    docstring): argmax at temperature 0, else temperature, top-k, top-p, then a draw from the
    softmax by `sampler`:
      multinomial   torch.multinomial, transformers' own draw (the same tokens from the same RNG state);
                    on a CPU it draws an exponential per vocabulary entry, ~15% of a SmolLM2 decoding step
      inverse_cdf   one uniform u per row, the first token whose cumulative probability exceeds
                    u x total (fp64 sums): the same distribution, V times fewer random numbers
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]   # [N, 1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False                                      # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    probs = scores.softmax(dim=-1)
    if sampler == "multinomial":
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)                                          # [N, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    # token i when cdf[i-1] <= u * total < cdf[i]: probability probs[i]; a token with none never drawn
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return picked.clamp_(max=probs.shape[-1] - 1).squeeze(1)


SAMPLERS = ("inverse_cdf", "multinomial")


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The generator sampling uses on `device`: the caller's when it lives there; a host generator
    with a model on an accelerator seeds a fresh device generator from one draw (a host op: the
    caller's generator state still says everything about the draws, so resume stays exact)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- generation

def _left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [P, T] with each prompt right-aligned, mask [P, T] (True = prompt token)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = True
    return ids, mask


def _forward_keywords(model, cache: Cache) -> dict:
    """The cache under the name the forward takes (transformers 5 renames `past_key_values` to
    `cache` family by family), and logits of the last position only where the family offers it."""
    params = inspect.signature(model.forward).parameters
    kw = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    return kw


def _num_layers(model) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def _validate(prompts, num_generations, max_new_tokens, temperature, top_p, top_k, stop_token_ids, check_every):
    if not prompts:
        raise RolloutError("no prompts to roll out")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise RolloutError(f"prompt {empty[0]} has no tokens")
    if num_generations < 1 or max_new_tokens < 1 or check_every < 1:
        raise RolloutError(f"need num_generations >= 1, max_new_tokens >= 1 and check_every >= 1, got "
                           f"{num_generations}, {max_new_tokens}, {check_every}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise RolloutError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, got {temperature}, {top_p}, {top_k}")
    if not stop_token_ids:
        raise RolloutError("stop_token_ids is empty: say which token ends a completion (EOS, end of turn)")


_CHECKED: WeakKeyDictionary = WeakKeyDictionary()
"""model -> None (the lean step computes its forward) or why not (its structure, or its probe): once per model."""

PROBE_TOKENS = 8


def _lean_decoder(model, probe: list[int], dtype: torch.dtype, layout: str | None,
                  dequantize_4bit: bool, rows: int = 8) -> tuple[LeanDecoder | None, str]:
    """(the rollout's LeanDecoder, its report line), or (None, why transformers' forward runs)."""
    try:
        with torch.autocast(next(model.parameters()).device.type, enabled=False):  # copies summed as stored
            if model not in _CHECKED:  # a structure refused or a probe that disagreed: decided once
                try:
                    _CHECKED[model] = _check_lean(model, probe)
                except NotRecognised as e:
                    _CHECKED[model] = str(e)
            if _CHECKED[model] is not None:
                raise NotRecognised(_CHECKED[model])
            decoder = LeanDecoder.build(model, dtype, layout, dequantize_4bit, rows)
    except NotRecognised as e:
        return None, f"transformers' forward (lean decode: {e})"
    return decoder, (f"lean decode: {len(decoder.layers)} layers, {decoder.bytes / 2**20:.0f} MiB of "
                     f"{'merged ' if layout else ''}decode copies")


def _check_lean(model, probe: list[int]) -> str | None:
    """None where the lean step's logits for the probe's last token equal the model's own forward
    (after the same prefill of the others), in the weights' dtype without autocast and without
    decode copies (every projection its module: the structure is what is checked), else why not."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    decoder = LeanDecoder.build(model, dtype, None, False)
    probe = (probe * 2)[:max(2, min(PROBE_TOKENS, len(probe)))]
    ids = torch.tensor([probe], dtype=torch.long, device=device)                   # [1, n]
    n = ids.shape[1]
    logits = []
    for lean in (False, True):
        cache = RolloutCache(_num_layers(model), n)
        kw = _forward_keywords(model, cache)
        model(input_ids=ids[:, :-1], **kw)
        if lean:
            logits.append(decoder.step(ids[:, -1], torch.full((1,), n - 1, device=device), cache,
                                       torch.zeros(1, 1, 1, n, dtype=dtype, device=device)))
        else:
            logits.append(model(input_ids=ids[:, -1:], **kw).logits[:, -1].float())
    reference, got = logits
    # sync: once per model, before its first rollout
    error = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
    if not error <= CHECK_TOLERANCE[dtype]:
        return f"its logits differ from the model's forward on a probe (max relative {error:.2g})"
    return None


@torch.no_grad()
def generate_rollouts(model, prompts: list[list[int]], *, num_generations: int, max_new_tokens: int,
                      temperature: float, top_p: float = 1.0, top_k: int = 0, stop_token_ids: list[int],
                      pad_token_id: int, generator: torch.Generator | None = None, check_every: int = 8,
                      share_prefill: bool = True, compact_rows: bool = True, sampler: str = "inverse_cdf",
                      autocast_dtype: torch.dtype | None = None, merge_lora: bool = True,
                      dequantize_4bit: bool = False, merged_layout: str | None = None,
                      lean_decode: bool = True) -> Rollouts:
    """`num_generations` completions of each prompt (token ids), prompt-major; see the module docstring.

    temperature 0 is greedy. The model runs as it is (LoRA on, 4-bit base or not), in eval mode
    and without autograd; its training mode is restored on return. `share_prefill` (speed switch)
    computes each prompt's KV once and repeats it for its G rows instead of prefilling P*G rows.
    `compact_rows` (speed switch) drops stopped rows from the decoding batch (and their KV) at a
    stop check once at most COMPACT_BELOW of the rows still run; the tokens are the same, the
    draws of a sampled rollout are then taken over fewer rows (reproducible, but not the draws
    of transformers' generate, which keeps every row). `sampler` (speed switch): how a sampled
    token is drawn from its distribution (`next_tokens`); "multinomial" draws what transformers'
    generate draws from the same RNG state.
    `merge_lora` (speed switch): every float-base LoRA layer computes on a merged decode copy
    W + s*B@A for the rollout (engine/layers/decode_merge.py: one GEMM per layer instead of the
    branch's several ops; the weights themselves are not touched); `dequantize_4bit` gives 4-bit
    bases such a copy too (16-bit memory for the rollout), else they keep the unmerged branch.
    `merged_layout` (speed switch, device-specific): how the decode copies are stored, "in_out",
    "out_in" or a packed layout the speed seam registered (the lean step's only, e.g. "onednn";
    transformers' forward then takes in_out: engine/model/lean_decode.py); None: `default_layout`.
    `lean_decode` (speed switch): the decode steps run `LeanDecoder.step` (engine/model/lean_decode.py,
    37 aten ops per layer instead of transformers' 98) where the model is a family it computes and its
    probe check agrees, else transformers' forward; the decode copies are then its own (concatenated
    per group, with `merge_lora`'s layout; without merge_lora every projection runs as its module).
    `autocast_dtype` runs the forwards under torch.autocast at that dtype (None: as the caller has it).
    """
    _validate(prompts, num_generations, max_new_tokens, temperature, top_p, top_k, stop_token_ids, check_every)
    if sampler not in SAMPLERS:
        raise RolloutError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if merged_layout is not None and merged_layout not in layouts():
        raise RolloutError(f"merged_layout must be one of {layouts()} (or None: the device's), got {merged_layout!r}")
    device = next(model.parameters()).device
    G, P = num_generations, len(prompts)
    N = P * G
    ids, mask = _left_pad(prompts, pad_token_id)                                  # [P, T]
    T = ids.shape[1]
    capacity = T + max_new_tokens
    if not share_prefill:  # the prompts repeated before the prefill: G identical rows computed
        ids, mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)               # as transformers' generate
    # the attention mask of every position the rows will have: the prompts', then all generated
    # ones (a stopped row's pads are attended by nothing that is kept)
    full_mask = torch.ones(N, capacity, dtype=torch.bool)
    full_mask[:, :T] = mask if not share_prefill else mask.repeat_interleave(G, dim=0)
    next_position = mask.sum(-1) if not share_prefill else mask.sum(-1).repeat_interleave(G)   # [N]
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    full_mask, next_position = full_mask.to(device), next_position.to(device)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    draw = _device_generator(generator, device)
    precision = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())

    layout = merged_layout or default_layout(device)
    dtype = autocast_dtype or model.get_input_embeddings().weight.dtype
    was_training = model.training
    model.eval()
    try:
        with precision, contextlib.ExitStack() as stack:
            decoder, decode = None, "transformers' forward"
            if lean_decode:
                decoder, decode = _lean_decoder(model, prompts[0], dtype, layout if merge_lora else None,
                                                dequantize_4bit, N)
            if decoder is None and merge_lora:  # transformers' forward on merged decode copies
                stack.enter_context(lora_merged_for_decode(model, dequantize_4bit=dequantize_4bit,
                                                           layout=layout if layout in LAYOUTS else "in_out"))
            cache = RolloutCache(_num_layers(model), T if share_prefill and G > 1 else capacity)
            forward_kw = _forward_keywords(model, cache)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **forward_kw)
            logits = out.logits[:, -1].float()                                    # [P or N, V]
            if share_prefill and G > 1:
                cache.repeat_rows(G, capacity)
                logits = logits.repeat_interleave(G, dim=0)                       # [N, V]
            del out
            if decoder is not None:
                cache.to_dtype(dtype)
                add_mask = torch.zeros(N, 1, 1, capacity, dtype=dtype, device=device).masked_fill_(
                    ~full_mask[:, None, None, :], -float("inf"))                  # [N, 1, 1, T + L]

            tokens = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
            rows = torch.arange(N, device=device)          # the output row of each decoded row
            stopped = torch.zeros(N, dtype=torch.bool, device=device)
            steps = 0
            while True:
                token = next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=draw,
                                    sampler=sampler)
                token = token.masked_fill(stopped, pad_token_id)                 # a stopped row emits pad
                tokens[rows, steps] = token
                stopped |= torch.isin(token, stops)
                steps += 1
                if steps == max_new_tokens:
                    break
                if steps % check_every == 0:
                    # sync: the rows' stopped flags, one small read every check_every tokens, never per token
                    live = [i for i, s in enumerate(stopped.tolist()) if not s]
                    if not live:
                        break
                    if compact_rows and len(live) <= COMPACT_BELOW * len(stopped):
                        keep = torch.tensor(live, device=device)
                        cache.select_rows(keep)
                        full_mask, next_position = full_mask[keep], next_position[keep]
                        token, rows, stopped = token[keep], rows[keep], stopped[keep]
                        if decoder is not None:
                            add_mask = add_mask[keep]
                if decoder is not None:
                    logits = decoder.step(token, next_position, cache, add_mask)
                else:
                    logits = model(input_ids=token[:, None], attention_mask=full_mask[:, :T + steps],
                                   position_ids=next_position[:, None], **forward_kw).logits[:, -1].float()
                next_position += 1
            # rows dropped by compaction had stopped
            finished = torch.ones(N, dtype=torch.bool, device=device).index_put_((rows,), stopped)
    finally:
        model.train(was_training)

    tokens = tokens[:, :steps]
    # sync: the rollouts go to the host once, to be cut, decoded and scored
    generated, finished = tokens.tolist(), finished.tolist()
    stop_set = set(stop_token_ids)
    completions = []
    for row in generated:
        end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        completions.append(row[:end])
    return Rollouts(completion_ids=completions, truncated=[not f for f in finished], tokens=tokens, decode=decode)
