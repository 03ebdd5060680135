"""Scores of generated answers: exact-match normalization and the unbiased pass@k estimator."""

from __future__ import annotations

import re
from typing import Sequence

_SPACE = re.compile(r"\s+")
# Trailing punctuation an answer may or may not carry ("Your number is 23." == "your number is 23").
_TRAILING = ".,;:!?…。！？、'\"`)]}"


def normalize(text: str) -> str:
    """strip, collapse whitespace, casefold, drop trailing punctuation."""
    text = _SPACE.sub(" ", text.strip()).casefold()
    return text.rstrip(_TRAILING + " ")


def exact_match(output: str, reference: str) -> float:
    return 1.0 if normalize(output) == normalize(reference) else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), written as a product so that large n neither
    overflows nor loses precision: C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples contains a passing one
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean_pass_at_k(scores: Sequence[Sequence[float]], k: int, threshold: float = 0.5) -> float:
    """pass@k averaged over prompts; `scores[p]` holds the n sample scores of prompt p.

    A sample passes when its score is at least `threshold` (checkers return 0/1 or
    a float in [0, 1]).
    """
    if not scores:
        return 0.0
    total = 0.0
    for per_prompt in scores:
        n = len(per_prompt)
        c = sum(1 for s in per_prompt if s >= threshold)
        total += pass_at_k(n, c, k)
    return total / len(scores)
