"""Paired bootstrap confidence intervals for candidate-minus-parent comparisons.

Paired: each resample draws item indices once and applies them to both versions, so the
interval reflects how the two versions differ on the same items, not the spread of items.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n_items: int,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)`, where indices has shape (samples, n_items)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n_items, size=(samples, n_items))
    values = statistic(indices)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def mean_delta_ci(candidate: np.ndarray, parent: np.ndarray, **kwargs) -> tuple[float, float]:
    """CI of mean(candidate) - mean(parent) over paired items."""
    diff = np.asarray(candidate, dtype=float) - np.asarray(parent, dtype=float)
    return bootstrap_ci(lambda idx: diff[idx].mean(axis=1), len(diff), **kwargs)


def perplexity_ratio_ci(
    candidate_nll: np.ndarray, parent_nll: np.ndarray, candidate_tokens: np.ndarray, parent_tokens: np.ndarray,
    **kwargs,
) -> tuple[float, float]:
    """CI of perplexity(candidate) / perplexity(parent), resampling whole texts."""
    c_nll, p_nll = np.asarray(candidate_nll, float), np.asarray(parent_nll, float)
    c_tok, p_tok = np.asarray(candidate_tokens, float), np.asarray(parent_tokens, float)

    def ratio(idx: np.ndarray) -> np.ndarray:
        return np.exp(c_nll[idx].sum(1) / c_tok[idx].sum(1) - p_nll[idx].sum(1) / p_tok[idx].sum(1))

    return bootstrap_ci(ratio, len(c_nll), **kwargs)
