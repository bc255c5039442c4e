"""An independent NumPy transcription of the published DCFF formulas (main_cifar.py), O(c^3).

Kept deliberately literal: float32 like the published PyTorch code, distances like scipy's cdist
(float64, then cast), softmax(-D / t) with t = 1 / T, and the (c, c, c) KL tensor.
"""

import math

import numpy as np


def published_temperature(epoch, num_epochs, t_start=1.0, t_end=10000.0, k=1.0):
    a = 2 * (t_end - t_start) * (1 + math.exp(-k * num_epochs)) / (1 - math.exp(-k * num_epochs))
    return a / (1 + math.exp(-k * epoch)) + t_start - a / 2


def published_distances(filters):
    w = np.asarray(filters, np.float64)
    diff = w[:, None, :] - w[None, :, :]
    return np.sqrt((diff**2).sum(-1)).astype(np.float32)


def published_softmax_p(distances, temperature):
    t = np.float32(1.0 / temperature)
    logits = (-distances / t).astype(np.float32)
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def published_scores(p):
    p = np.asarray(p, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = p[:, None, :] / (p[None, :, :] + np.float32(1e-7))
        kl = np.mean(p[:, None, :] * np.log(ratio), axis=2)
    return kl.sum(axis=1)


def exact_scores(distances, temperature):
    """Float64 log-space KL with the same mean-over-i scale, for the 'exact' criterion."""
    logits = -np.asarray(distances, np.float64) * temperature
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    kl = np.mean(p[:, None, :] * (log_p[:, None, :] - log_p[None, :, :]), axis=2)
    return kl.sum(axis=1)
