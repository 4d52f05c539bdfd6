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


def detectable_change(diffs: np.ndarray, floor_sd: float = 0.0, confidence: float = 0.95,
                      power: float = 0.8) -> float:
    """The smallest true mean paired difference that a two-sided test at `confidence` detects with
    probability `power` at this many items: (z_(1-alpha/2) + z_power) * sd(diff) / sqrt(n)
    (the sample-size rule in Miller, "Adding Error Bars to Evals", 2024).

    `floor_sd` bounds sd(diff) from below: on 0/1 items two versions that agree on every item give an
    observed sd of 0, which says nothing about what a regression would look like. Callers pass
    sqrt(p(1 - p)) of the parent's rate there (paired items with correlation 0.5).
    """
    from statistics import NormalDist

    diffs = np.asarray(diffs, float)
    if len(diffs) < 2:
        return float("inf")
    sd = max(float(np.std(diffs, ddof=1)), floor_sd)
    z = NormalDist().inv_cdf
    return (z(0.5 + confidence / 2) + z(power)) * sd / float(np.sqrt(len(diffs)))
