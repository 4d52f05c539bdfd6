"""Task metrics: how a generated answer is scored against the reference answer.

Normalisation (applied to both sides before exact_match and contains):
  1. Unicode NFKC (full-width digits, ligatures and the like become plain characters),
  2. casefold (lowercase, Unicode-aware),
  3. collapse every run of whitespace to one space and strip both ends,
  4. strip wrapping quotes/backticks and trailing punctuation `. ! ? , ; :` (repeatedly).
So "  The answer is: PARIS. " exact-matches nothing but contains "paris", and "Paris." exact-matches "paris".

Metrics, each in [0, 1]:
  - exact_match: normalised prediction == normalised reference.
  - contains: normalised reference is a substring of the normalised prediction
    (an empty reference only matches an empty prediction).
  - rougeL: F1 of the longest common subsequence of word tokens (`\\w+` after normalisation,
    Unicode-aware, so it works beyond English), as in ROUGE-L without stemming.
"""

from __future__ import annotations

import re
import unicodedata

from sculptor.datasets import Metric

_WRAPPERS = "\"'`“”‘’"
_TRAILING = ".!?,;:"


def normalise(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    previous = None
    while previous != text:
        previous = text
        text = text.strip().strip(_WRAPPERS).rstrip(_TRAILING)
    return text


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def contains(prediction: str, reference: str) -> float:
    ref = normalise(reference)
    pred = normalise(prediction)
    return float(ref in pred) if ref else float(not pred)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred = re.findall(r"\w+", normalise(prediction))
    ref = re.findall(r"\w+", normalise(reference))
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "contains": contains, "rougeL": rouge_l}


def score(metric: Metric, prediction: str, reference: str) -> float:
    return METRICS[metric](prediction, reference)
