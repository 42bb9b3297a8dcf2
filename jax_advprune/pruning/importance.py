"""Per-sample importance scores from predictions and training histories (baselines of both papers).

Every function maps arrays indexed by sample to a score vector (N,) float32,
higher = more important, except where stated. Formulas, sources and our readings:
docs/algorithms.md.
"""

from __future__ import annotations

import numpy as np

SCORES = ("margin", "el2n", "grand", "forgetting", "du", "fp", "random")


def el2n(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N (Paul et al. 2021): ||softmax(f(x)) - onehot(y)||_2 per sample.

    probs (N, K) predicted probabilities (average them over seeds/checkpoints
    outside, or average the scores); labels (N,) int. Returns (N,) in [0, sqrt(2)].
    """
    probs = np.asarray(probs, np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels)]
    return np.linalg.norm(probs - onehot, axis=1).astype(np.float32)


def grand_last_layer(probs: np.ndarray, labels: np.ndarray, features: np.ndarray) -> np.ndarray:
    """GraNd (Paul et al. 2021) restricted to the last dense layer, in closed form.

    The cross-entropy gradient w.r.t. the head's kernel is features ⊗ (p - y) and
    w.r.t. its bias p - y, so the norm is ||p - y|| * sqrt(||features||^2 + 1).
    probs (N, K), labels (N,), features (N, D) penultimate activations -> (N,).
    """
    residual = el2n(probs, labels).astype(np.float64)
    return (residual * np.sqrt(np.sum(np.asarray(features, np.float64) ** 2, axis=1) + 1.0)).astype(np.float32)


def forgetting_events(correct: np.ndarray, never_learned: float | None = None) -> np.ndarray:
    """Forgetting events (Toneva et al. 2019): transitions correct -> incorrect between records.

    correct (E, N) bool, one row per recorded epoch. Samples never classified
    correctly get `never_learned` (default E, above any possible count, as the
    paper ranks them as the most forgettable). Returns (N,) float32.
    """
    correct = np.asarray(correct, bool)
    events = np.sum(correct[:-1] & ~correct[1:], axis=0).astype(np.float32)
    never = ~correct.any(axis=0)
    events[never] = correct.shape[0] if never_learned is None else never_learned
    return events


def dynamic_uncertainty(true_probs: np.ndarray, window: int = 10) -> np.ndarray:
    """Dynamic uncertainty (He et al. 2023; Nieth et al.): mean over k of std(p_k .. p_{k+J-1}, ddof=1).

    true_probs (E, N): probability of the true class per recorded epoch; E >= window.
    Returns (N,) float32; a constant history scores 0.
    """
    p = np.asarray(true_probs, np.float64)
    if p.shape[0] < window:
        raise ValueError(f"dynamic uncertainty needs at least window={window} recorded epochs, got {p.shape[0]}")
    windows = np.lib.stride_tricks.sliding_window_view(p, window, axis=0)  # (E - J + 1, N, J)
    return windows.std(axis=-1, ddof=1).mean(axis=0).astype(np.float32)


def frequency_score(true_probs: np.ndarray) -> np.ndarray:
    """FP (Nieth et al.): sum over f >= 1 of |FFT(p_t)[f]| of the true-class probability history.

    true_probs (E, N) -> (N,) float32; a constant history scores 0.
    """
    spectrum = np.fft.fft(np.asarray(true_probs, np.float64), axis=0)
    return np.abs(spectrum[1:]).sum(axis=0).astype(np.float32)


def random_scores(n: int, seed: int) -> np.ndarray:
    """Uniform [0, 1) scores (N,) from the seed: the random baseline as a score."""
    return np.random.default_rng([seed, 11]).random(n).astype(np.float32)
