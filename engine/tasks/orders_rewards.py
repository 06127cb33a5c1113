"""Reward functions for the orders task (engine/tasks/orders.py), written for GRPO as TRL's
GRPOTrainer calls them: fn(prompts, completions, completion_ids, answer=[...], **other_columns).

    objective.rewards: ["engine.tasks.orders_rewards:json_valid", "engine.tasks.orders_rewards:fields",
                        "engine.tasks.orders_rewards:exact_match"]

`answer` is the prompt file's column holding the canonical JSON answer. Completions are strings
(plain prompts) or [{"role": "assistant", "content": text}] (conversational prompts).

    json_valid   1 when the completion holds a JSON object (orders.extract_answer), else 0
    fields       the share of the four fields (customer, items, city, shipping) equal to the answer's
    exact_match  1 when the completion is exactly the canonical answer (orders.score's "exact")

The GRPO quickstart asks only for the order's city (`city_prompt`; `answer` = the city):

    city_mentioned  1 when the completion names the city
    city_exact      1 when the completion is the city name alone
    city_concise    the city's share of the answer's characters when it is named (1 for the city
                    alone, ~0.1 for a sentence around it), else 0: a graded signal toward the bare
                    name, which the base model never samples at first (city_exact alone would give
                    every group equal rewards, so no advantage and no gradient)
"""

from __future__ import annotations

from engine.tasks import orders


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _scores(completions, answer) -> list[dict]:
    return [orders.score(_text(c), a) for c, a in zip(completions, answer)]


def json_valid(completions, answer, **kwargs) -> list[float]:
    return [s["json_valid"] for s in _scores(completions, answer)]


def fields(completions, answer, **kwargs) -> list[float]:
    return [sum(s[k] for k in orders.FIELDS) / len(orders.FIELDS) for s in _scores(completions, answer)]


def exact_match(completions, answer, **kwargs) -> list[float]:
    return [s["exact"] for s in _scores(completions, answer)]


# ---- the GRPO quickstart's question: which city? (scripts/make_quickstart_grpo_data.py) ----
CITY_QUESTION = "Which city is this order shipped to? Reply with the city name only."


def city_prompt(order_text: str) -> list[dict]:
    """The GRPO quickstart's conversational prompt for one order."""
    return [{"role": "user", "content": f"{order_text}\n\n{CITY_QUESTION}"}]


def _normal(text: str) -> str:
    return " ".join(text.strip().strip(".!\"'").split()).lower()


def city_mentioned(completions, answer, **kwargs) -> list[float]:
    """1 when the completion names the order's city anywhere (case-insensitive), else 0."""
    return [float(a.lower() in _text(c).lower()) for c, a in zip(completions, answer)]


def city_exact(completions, answer, **kwargs) -> list[float]:
    """1 when the completion is the city name and nothing else (case, spaces and a final period aside)."""
    return [float(_normal(_text(c)) == a.lower()) for c, a in zip(completions, answer)]


def city_concise(completions, answer, **kwargs) -> list[float]:
    """len(city) / len(answer) (normalised as city_exact) when the completion names the city, else 0."""
    out = []
    for c, a in zip(completions, answer):
        text = _normal(_text(c))
        out.append(len(a) / max(len(text), len(a)) if a.lower() in text else 0.0)
    return out
