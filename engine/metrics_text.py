"""Text-match scores of a generation against a reference answer: exact match, token F1, ROUGE-L.

    normalize(s)   = lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace
                     (the SQuAD v1.1 evaluation script's `normalize_answer`, Rajpurkar et al. 2016)
    exact_match    = 1 if normalize(pred) == normalize(ref) else 0
    token_f1       = 2 P R / (P + R) with P = |common| / |pred tokens|, R = |common| / |ref tokens|,
                     |common| the size of the multiset intersection of the normalized tokens (SQuAD)
    rouge_l        = F-measure of the longest common subsequence of the normalized tokens:
                     P = LCS / |pred|, R = LCS / |ref|, F = 2 P R / (P + R) (Lin 2004, beta = 1)

All three are in [0, 1]; two empty strings score 1, one empty string against a non-empty one 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, strip punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _f_measure(common: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 or n_ref == 0:
        return float(n_pred == n_ref)
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_ref
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 over the normalized whitespace tokens (multiset overlap)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    return _f_measure(common, len(pred), len(ref))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) over the normalized whitespace tokens."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    return _f_measure(lcs_length(pred, ref), len(pred), len(ref))


def text_scores(prediction: str, reference: str) -> dict[str, float]:
    """{"exact_match", "token_f1", "rouge_l"} of one generation."""
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference)}
