"""Binary probability calibration: reliability (ECE), temperature and Platt scaling, shared by the
classification tasks (pure numpy)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), p clipped to [1e-6, 1 - 1e-6]."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def binary_ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of P(positive): mean |observed rate - mean probability| over equal-width
    probability bins, weighted by count."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    return float(sum((idx == b).mean() * abs(y[idx == b].mean() - p[idx == b].mean())
                     for b in range(bins) if (idx == b).any()))


def binary_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """Temperature T minimising the log-loss of sigmoid(logit(p) / T) (grid search)."""
    z = logit(p)

    def nll(t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-z / t)), 1e-9, 1 - 1e-9)
        return float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())

    return float(min(np.exp(np.linspace(np.log(0.25), np.log(8), 300)), key=nll))


def apply_temperature(p: float | np.ndarray, t: float) -> float | np.ndarray:
    """Calibrated probability; the order (and so every decision at the matching threshold) is unchanged."""
    return 1 / (1 + np.exp(-logit(np.asarray(p, dtype=float)) / t))


def binary_platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Slope a and intercept b minimising the log-loss of sigmoid(a * logit(p) + b) (Platt scaling on the
    model's logit; a temperature is the case b = 0). Newton steps on the two parameters."""
    z = logit(np.asarray(p, dtype=float))
    y = np.asarray(y, dtype=float)
    w = np.array([1.0, 0.0])
    X = np.stack([z, np.ones_like(z)], axis=1)
    for _ in range(50):
        q = 1 / (1 + np.exp(-(X @ w)))
        g = X.T @ (q - y)
        h = (X * (q * (1 - q))[:, None]).T @ X + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def apply_platt(p: float | np.ndarray, slope: float, intercept: float) -> float | np.ndarray:
    """sigmoid(slope * logit(p) + intercept): monotone for slope > 0, so decisions at the mapped threshold
    are unchanged."""
    return 1 / (1 + np.exp(-(slope * logit(np.asarray(p, dtype=float)) + intercept)))


def log_loss(y: np.ndarray, q: np.ndarray) -> float:
    q = np.clip(q, 1e-9, 1 - 1e-9)
    return float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())


def cross_fitted(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict:
    """Temperature and Platt scaling, each fitted on all groups but one and applied to that one (so every
    probability is mapped by a map that did not see it): ECE and log-loss of both, and the method with the
    lower log-loss (Platt only with a positive slope), with its map fitted on everything.
    y (N,) 0/1, p (N,) probabilities, groups (N,) fold ids."""
    y, p, groups = np.asarray(y, float), np.asarray(p, float), np.asarray(groups)
    ct, cp = np.empty_like(p), np.empty_like(p)
    for g in np.unique(groups):
        tr, te = groups != g, groups == g
        ct[te] = apply_temperature(p[te], binary_temperature(y[tr], p[tr]))
        a, b = binary_platt(y[tr], p[tr])
        cp[te] = apply_platt(p[te], a, b)
    t = binary_temperature(y, p)
    a, b = binary_platt(y, p)
    compared = {"temperature": {"ece_cross_fitted": binary_ece(y, ct), "log_loss_cross_fitted": log_loss(y, ct)},
                "platt": {"ece_cross_fitted": binary_ece(y, cp), "log_loss_cross_fitted": log_loss(y, cp)}}
    platt = a > 0 and compared["platt"]["log_loss_cross_fitted"] < compared["temperature"]["log_loss_cross_fitted"]
    return {"method": "platt" if platt else "temperature", "slope": a if platt else 1 / t,
            "intercept": b if platt else 0.0, "temperature": t, "compared": compared,
            "ece_before": binary_ece(y, p), "log_loss_before": log_loss(y, p),
            "ece_after_cross_fitted": compared["platt" if platt else "temperature"]["ece_cross_fitted"],
            "cross_fitted": cp if platt else ct}


def ece_if_calibrated(p: np.ndarray, ece: Callable[[np.ndarray, np.ndarray], float], observed: float,
                      n_sim: int = 1000, seed: int = 0) -> dict:
    """What ECE a perfectly calibrated classifier with these same probabilities would show on this many
    cases (labels drawn from the probabilities themselves; consistency resampling, Bröcker & Smith 2007).

    ECE over a few dozen cases is biased upwards and noisy: a small observed figure can only be read
    against this. ``p``: (N,) P(positive) or (N, K) class probabilities (rows sum to 1); ``ece(y, p)``:
    the ECE function the observed figure came from. -> {median, q95: the simulated ECE's median and
    95th percentile, p_value: share of simulations >= observed, n_sim}."""
    p = np.asarray(p, dtype=float)
    rng = np.random.default_rng(seed)
    sims = np.empty(n_sim)
    for i in range(n_sim):
        u = rng.random(len(p))
        if p.ndim == 1:
            y = (u < p).astype(float)
        else:
            cdf = np.cumsum(p / p.sum(1, keepdims=True), axis=1)
            y = np.minimum((u[:, None] >= cdf).sum(1), p.shape[1] - 1)
        sims[i] = ece(y, p)
    return {"median": float(np.median(sims)), "q95": float(np.quantile(sims, 0.95)),
            "p_value": float((sims >= observed - 1e-12).mean()), "n_sim": int(n_sim)}
