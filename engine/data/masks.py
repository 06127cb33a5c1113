"""Loss control: which tokens of a rendered conversation carry loss, and whose turn each token is.

    loss_on=assistant        every assistant reply (its tool calls and end-of-turn included)
    loss_on=last_assistant   the final assistant reply only
    loss_on=all              every token
    message "train": true    that message's turn carries loss too (any role: its region)
    message "train": false   that message's turn carries none (an assistant reply, or, with all, any turn)
    train_on_reasoning=false an assistant reply's reasoning trace (<think> ... </think>) carries none

Tool results, the system prompt and the tool schemas the template writes carry no loss unless a
message flag (or loss_on=all) says so. Spans are character ranges of the rendered text
(render.py); a token carries loss when its characters overlap a trained span and (loss_on=all)
lie outside every excluded one.
"""

from __future__ import annotations

import numpy as np

from engine.data.render import RenderedChat, token_mask

ROLE_NAMES = ("(template)", "system", "user", "assistant", "tool", "reasoning", "text")
ROLE_INDEX = {name: i for i, name in enumerate(ROLE_NAMES)}


def trained_spans(r: RenderedChat, messages: list[dict], loss_on: str,
                  train_on_reasoning: bool) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(trained character spans, excluded character spans) of one rendered conversation."""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = replies[-1] if replies else None
    trained, excluded = [], []
    reply = {i: k for k, i in enumerate(replies)}
    for i, m in enumerate(messages):
        flag = m.get("train")
        if m["role"] == "assistant":
            k = reply[i]
            start, end = r.spans[k]
            trace = r.traces[k] if k < len(r.traces) else None
            if not train_on_reasoning and trace is not None:
                excluded.append(trace)
                start = trace[1]
            default = loss_on == "all" or loss_on == "assistant" or i == last
            if flag is False:
                excluded.append(r.spans[k])
            elif flag or default:
                trained.append((start, end))
            continue
        region = r.regions[i] if i < len(r.regions) else None
        if flag is not None and region is None:
            raise ValueError(f"message {i} ({m['role']}) sets \"train\" but the chat template renders its turn "
                             "differently depending on what follows; cannot tell which tokens are its own")
        if flag is True:
            trained.append(region)
        elif flag is False:
            excluded.append(region)
    if loss_on == "all":
        trained = [(0, len(r.text))]
    return trained, excluded


def conversation_mask(r: RenderedChat, messages: list[dict], offsets: np.ndarray, loss_on: str,
                      train_on_reasoning: bool) -> np.ndarray:
    """[n] bool: the tokens that carry loss (module docstring). offsets: [n, 2] char ranges."""
    trained, excluded = trained_spans(r, messages, loss_on, train_on_reasoning)
    mask = token_mask(offsets, trained)
    a, b = offsets[:, 0], offsets[:, 1]
    for s, e in excluded:
        mask &= ~((a >= s) & (b <= e) & (b > a))  # tokens wholly inside an excluded span
    return mask


def token_roles(r: RenderedChat | None, messages: list[dict] | None, offsets: np.ndarray) -> np.ndarray:
    """[n] int8: ROLE_INDEX of the turn each token belongs to (a text document: all "text")."""
    if r is None:
        return np.full(len(offsets), ROLE_INDEX["text"], dtype=np.int8)
    roles = np.zeros(len(offsets), dtype=np.int8)
    starts = offsets[:, 0]
    for m, region in zip(messages, r.regions):
        if region is not None:
            roles[(starts >= region[0]) & (starts < region[1])] = ROLE_INDEX[m["role"]]
    for trace in r.traces:
        if trace is not None:
            roles[(starts >= trace[0]) & (starts < trace[1])] = ROLE_INDEX["reasoning"]
    return roles


def count_by_role(roles: np.ndarray, mask: np.ndarray, into: dict) -> None:
    """Add the loss-carrying tokens' counts per role to `into` ({role name: count}). A label at t
    predicts token t+1, so the count is over mask[1:] (the first token is never a target)."""
    counts = np.bincount(roles[1:][mask[1:]], minlength=len(ROLE_NAMES))
    for i, c in enumerate(counts):
        if c:
            into[ROLE_NAMES[i]] = into.get(ROLE_NAMES[i], 0) + int(c)
