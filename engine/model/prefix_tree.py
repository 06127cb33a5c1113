"""Attention of a tree document: one shared prefix, several branches that each see it and themselves.

GRPO trains G completions of one prompt (engine/grpo/batches.py, switch objective.share_prompt).
As G separate documents `prompt + completion_i` the prompt is computed G times, forward and
backward; as one tree document it is computed once:

    tokens:     [ prefix (p) | branch 1 (L1) | branch 2 (L2) | ... | branch G (LG) ]
    positions:  [ 0 .. p-1   | p .. p+L1-1   | p .. p+L2-1   | ... ]    (as each unshared document has them)
    attention:  prefix query i:    prefix keys j <= i                         (causal)
                branch g query i:  every prefix key, branch g's keys j <= i   (never another branch's)

The prefix's hidden states do not depend on any branch, so every branch's output equals what its
own `prefix + branch` document gives, and in backward the prefix's gradients are the sum over the
branches: the same loss and gradients as the unshared documents, for ~p (G - 1) fewer tokens.

`tree_attention` computes one tree document in two calls:

    prefix     causal SDPA over q, k, v[prefix]                          [1, H, p, D]
    branches   padded to Lmax = max L_g, queries [G, H, Lmax, D] against
               keys / values cat(prefix K/V expanded G times, branch K/V)  [G, H_kv, p + Lmax, D]
               with one boolean mask [Lmax, p + Lmax] for every branch:

                   key j:      0 ........ p-1 | p ....... p+Lmax-1
                   query i:    all visible    | j - p <= i   (bottom-right causal)

               Padding sits after a branch's real tokens, so a real query (i < L_g) never sees a
               padded key (j - p >= L_g > i); the padded queries' outputs are dropped.

A sliding window is a condition on positions (query p + i, key j: p + i - j < window), added to the
same masks; logit soft-capping runs the eager path with them (`masked_attention`). Grouped K/V heads
are repeated per call, as `engine.model.attention.sdpa_per_document` does. Masks and the index
tensors of unequal branches are host-known: made once per shape per forward in the packing
context's `kernel_cache` (no device read).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv


def masked_attention(q, k, v, allowed: torch.Tensor, *, scale: float, softcap: float | None, dropout: float,
                     training: bool) -> torch.Tensor:
    """Eager attention with a boolean mask (True = attend), as transformers' eager path:
        S = scale q k^T  (-> softcap tanh(S / softcap)),  masked where not allowed,
        P = softmax(S) in (at least) fp32,  out = dropout(P) v
    q [n, H, q, D], k / v [n, H_kv, kv, D], allowed [q, kv] -> [n, H, q, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v)


def causal_window_mask(n_q: int, n_kv: int, window: int | None, device) -> torch.Tensor:
    """[n_q, n_kv] bool: queries at positions n_kv - n_q .. n_kv - 1, keys at 0 .. n_kv - 1 (the
    bottom-right alignment), key j seen by query at i iff j <= i and i - j < window."""
    q_pos = torch.arange(n_kv - n_q, n_kv, device=device)[:, None]
    k_pos = torch.arange(n_kv, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    return allowed


def tree_attention(query, key, value, out, b: int, start: int, prefix: int, branches: tuple[int, ...], *,
                   scale: float, window: int | None, softcap: float | None, dropout: float, training: bool,
                   cache: dict) -> None:
    """Write the attention output of row b's tree document at `start` into out [B, T, H, D]
    (module docstring). query [B, H, T, D], key / value [B, H_kv, T, D]; `dropout` the
    probability in training (0 otherwise); `cache`: the packing context's kernel_cache."""
    device = query.device
    H, D = query.shape[1], query.shape[3]
    groups = H // key.shape[1]
    p, G, L = prefix, len(branches), max(branches)
    total = sum(branches)
    eager = softcap is not None

    # the prefix: plain causal attention (a window that bites: its mask)
    q, k, v = (t[b:b + 1, :, start:start + p] for t in (query, key, value))
    if eager or (window is not None and p > window):
        mask = _cached(cache, ("tree_mask", p, p, window, str(device)), lambda: causal_window_mask(p, p, window, device))
        o = masked_attention(q, k, v, mask, scale=scale, softcap=softcap, dropout=dropout, training=training)
    else:
        o = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), dropout_p=dropout,
                                           is_causal=True, scale=scale)
    out[b, start:start + p] = o[0].transpose(0, 1)

    # the branches, padded to [G, *, L, D]: a view when they are all L long, a gather otherwise
    s0 = start + p
    if all(n == L for n in branches):
        qb, kb, vb = (t[b, :, s0:s0 + total].unflatten(1, (G, L)).transpose(0, 1) for t in (query, key, value))
        real = None
    else:
        gather, real = _cached(cache, ("tree_index", branches, str(device)), lambda: _branch_index(branches, device))
        qb, kb, vb = (t[b, :, s0:s0 + total].index_select(1, gather).unflatten(1, (G, L)).transpose(0, 1)
                      for t in (query, key, value))                                   # [G, h, L, D]
    kp, vp = (t[b:b + 1, :, start:start + p].expand(G, -1, -1, -1) for t in (key, value))
    kc, vc = torch.cat([kp, kb], dim=2), torch.cat([vp, vb], dim=2)                  # [G, H_kv, p + L, D]
    mask = _cached(cache, ("tree_mask", L, p + L, window, str(device)),
                   lambda: causal_window_mask(L, p + L, window, device))             # [L, p + L]
    if eager:
        o = masked_attention(qb, kc, vc, mask, scale=scale, softcap=softcap, dropout=dropout, training=training)
    else:
        o = F.scaled_dot_product_attention(qb, repeat_kv(kc, groups), repeat_kv(vc, groups), attn_mask=mask,
                                           dropout_p=dropout, scale=scale)            # [G, H, L, D]
    o = o.transpose(1, 2).reshape(G * L, H, D)
    out[b, s0:s0 + total] = o if real is None else o.index_select(0, real)


def _branch_index(branches: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather [G * Lmax], real [sum L]): the padded layout's source token (relative to the first
    branch; a padded slot repeats its branch's last token) and, per real token in order, its slot."""
    L = max(branches)
    gather, real, offset = [], [], 0
    for g, n in enumerate(branches):
        gather += [offset + min(t, n - 1) for t in range(L)]
        real += [g * L + t for t in range(n)]
        offset += n
    return (torch.tensor(gather, dtype=torch.long, device=device),
            torch.tensor(real, dtype=torch.long, device=device))


def _cached(cache: dict, key, make):
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    return value
