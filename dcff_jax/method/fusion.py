"""DCFF fusion math: pure, jit-able functions of arrays.

Per fused layer with full filters W of shape (c, d) (c = c_out, d = c_in * kh * kw), once per
epoch (paper Sec. 3, REFERENCE.md steps 1-7):

  D = pairwise_distances(W)                      (c, c)
  T = temperature(epoch, num_epochs)             scalar
  P = proxies(D, T) = row-softmax(-D * T)        (c, c)
  s = importance(D, T, criterion)                (c,)
  kept = the m highest scores, in stable slots   (m,)
  F = P[kept]                                    (m, c), the fusion matrix
  fused kernel = F @ W                           (m, d)

`update_fusion` applies all of this to every fused layer of a model in one jitted call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

# The published code adds this to the denominator of its KL ratio (REFERENCE.md step 4).
REFERENCE_EPS = 1e-7
CRITERIA = ("reference", "exact")
FUSION_COLLECTION = "fusion"

Array = jax.Array


def pairwise_distances(filters: Array) -> Array:
    """Euclidean distances between flattened filters.

    Args:
      filters: (c, d) array, one filter per row.

    Returns:
      (c, c) float32 array D with D[i, j] = ||filters[i] - filters[j]||_2 and exact zeros on the
      diagonal. Uses the Gram form (O(c^2 + c d) memory, never the (c, c, d) differences).
    """
    w = jnp.asarray(filters, jnp.float32)
    gram = jnp.matmul(w, w.T, precision=jax.lax.Precision.HIGHEST)
    sq_norms = jnp.diagonal(gram)
    sq = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0)
    return jnp.where(jnp.eye(w.shape[0], dtype=bool), 0.0, jnp.sqrt(sq))


def temperature(epoch, num_epochs, t_start: float = 1.0, t_end: float = 1e4, k: float = 1.0):
    """The paper's temperature schedule T(e), Eq. (8): a sigmoid in epochs from Ts to Te.

    T(0) = t_start and T(num_epochs) = t_end. With Python numbers it is computed in float64 like
    the published code and returns a float; with a traced or array epoch it returns a float32
    array (usable inside jit).
    """
    if isinstance(num_epochs, (int, float)) and num_epochs <= 0:
        raise ValueError(
            f"num_epochs must be positive for the temperature schedule, got {num_epochs}"
        )
    if all(isinstance(v, (int, float)) for v in (epoch, num_epochs, t_start, t_end, k)):
        decay = math.exp(-k * num_epochs)
        a = 2.0 * (t_end - t_start) * (1.0 + decay) / (1.0 - decay)
        return a / (1.0 + math.exp(-k * epoch)) + t_start - a / 2.0
    epoch = jnp.asarray(epoch, jnp.float32)
    decay = jnp.exp(-k * jnp.asarray(num_epochs, jnp.float32))
    a = 2.0 * (t_end - t_start) * (1.0 + decay) / (1.0 - decay)
    return a / (1.0 + jnp.exp(-k * epoch)) + t_start - a / 2.0


def proxies(distances: Array, temperature: Array | float) -> Array:
    """Inter-similarity distributions P = row-softmax(-D * T), Eq. (5).

    Args:
      distances: (c, c) pairwise distances.
      temperature: scalar T > 0.

    Returns:
      (c, c) float32; row j is filter j's distribution over all c filters. Tends to the identity
      as T grows (the diagonal distance is 0). Off-diagonal entries underflow to exactly 0 once
      T * D exceeds ~100 in float32.
    """
    return jax.nn.softmax(-jnp.asarray(distances, jnp.float32) * temperature, axis=-1)


def importance(distances: Array, temperature: Array | float, criterion: str = "reference") -> Array:
    """Dynamic-coded importance, Eq. (6)-(7): score[j] = sum_k KL(P_j || P_k), shape (c,).

    Both criteria run in O(c^2) time and memory through the identity
    sum_k P[j,i] log(P[j,i] / Q[k,i]) = c * P[j,i] * (log P[j,i] - mean_k log Q[k,i]).

    criterion:
      "reference": the published formula, mean over i and Q = P + 1e-7. Like the published code it
        yields a non-finite score for every row j in which some P[j, i] underflowed to 0
        (0 * log 0), which `update_fusion` answers with the published freeze rule.
      "exact": KL computed in log space from log_softmax (no epsilon), so it stays finite at every
        temperature and the ranking keeps following the filters through training. As T grows it
        approaches T * mean_k D[k, j] (far-from-the-rest filters rank highest). Same scale as
        "reference"; where both are finite they differ only by the epsilon.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    logits = -jnp.asarray(distances, jnp.float32) * temperature
    if criterion == "reference":
        p = jax.nn.softmax(logits, axis=-1)
        # p * log(p) (not xlogy) so that underflowed proxies give NaN exactly as published.
        mean_log_q = jnp.mean(jnp.log(p + REFERENCE_EPS), axis=0)
        return jnp.sum(p * jnp.log(p) - p * mean_log_q[None, :], axis=-1)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    mean_log_q = jnp.mean(log_p, axis=0)
    return jnp.sum(jnp.exp(log_p) * (log_p - mean_log_q[None, :]), axis=-1)


def select_kept(scores: Array, previous_kept: Array) -> Array:
    """The m highest-scoring filters, placed in stable slots.

    Slot r of the fusion matrix feeds output channel r, to which the next layer's input weights and
    the batch-norm statistics are tied, so a filter that stays selected keeps its slot. Filters
    that enter take the freed slots in order of decreasing score (ties: lower index first), the
    freed slots taken in increasing slot order.

    Args:
      scores: (c,) finite importance scores.
      previous_kept: (m,) int32 filter indices of the previous selection, all distinct.

    Returns:
      (m,) int32 filter indices.
    """
    c, m = scores.shape[0], previous_kept.shape[0]
    _, top = jax.lax.top_k(scores, m)
    new_mask = jnp.zeros((c,), bool).at[top].set(True)
    old_mask = jnp.zeros((c,), bool).at[previous_kept].set(True)
    stays = new_mask[previous_kept]
    entering = new_mask & ~old_mask
    # Entering filters first, by decreasing score; argsort is stable, so ties keep index order.
    entering_order = jnp.argsort(jnp.where(entering, -scores, jnp.inf), stable=True)
    free_slot_rank = jnp.cumsum(~stays) - 1
    return jnp.where(stays, previous_kept, entering_order[free_slot_rank]).astype(jnp.int32)


def fusion_matrix(proxy: Array, kept: Array) -> Array:
    """F = P[kept]: (c, c), (m,) -> (m, c). Row r fuses all c filters into output channel r."""
    return jnp.take(proxy, kept, axis=0)


def fuse_kernel(kernel: Array, matrix: Array) -> Array:
    """Fused kernel F @ W in the filter axis.

    Args:
      kernel: (..., c) array whose last axis indexes filters, e.g. a (kh, kw, c_in, c) conv kernel
        or a (c,) bias.
      matrix: (m, c) fusion matrix.

    Returns:
      (..., m) array in kernel's dtype.
    """
    compute = jnp.promote_types(kernel.dtype, jnp.float32)  # float32, or float64 under x64
    fused = jnp.einsum(
        "...c,mc->...m",
        kernel.astype(compute),
        matrix.astype(compute),
        precision=jax.lax.Precision.HIGHEST,
    )
    return fused.astype(kernel.dtype)


def init_fusion_state(num_filters: int, num_kept: int) -> dict[str, Array]:
    """A layer's fusion state before the first update: the first m filters, unfused.

    Returns:
      {"matrix": (m, c) float32 identity rows, "scores": (c,) float32 zeros,
       "kept": (m,) int32 arange(m)}.
    """
    if not 1 <= num_kept <= num_filters:
        raise ValueError(f"kept width must be in [1, {num_filters}], got {num_kept}")
    return {
        "matrix": jnp.eye(num_kept, num_filters, dtype=jnp.float32),
        "scores": jnp.zeros((num_filters,), jnp.float32),
        "kept": jnp.arange(num_kept, dtype=jnp.int32),
    }


def update_layer(
    filters: Array, state: Mapping[str, Array], temperature: Array | float, criterion: str
) -> tuple[dict[str, Array], dict[str, Array]]:
    """One layer's epoch update, with the published freeze rule.

    Args:
      filters: (c, d) full filters (gradients are not taken through the update).
      state: {"matrix": (m, c), "scores": (c,), "kept": (m,)}.
      temperature: scalar T.
      criterion: "reference" or "exact".

    Returns:
      (new_state, info). A layer whose new scores are not all finite keeps its previous scores and
      selection (published behaviour); its fusion matrix still uses this epoch's proxies.
      info = {"frozen": bool scalar, "changed": int32 scalar, the number of slots whose filter
      changed}.
    """
    filters = jax.lax.stop_gradient(filters)
    distances = pairwise_distances(filters)
    proxy = proxies(distances, temperature)
    new_scores = importance(distances, temperature, criterion)
    finite = jnp.all(jnp.isfinite(new_scores))
    scores = jnp.where(finite, new_scores, state["scores"])
    kept = jnp.where(finite, select_kept(scores, state["kept"]), state["kept"])
    new_state = {"matrix": fusion_matrix(proxy, kept), "scores": scores, "kept": kept}
    info = {"frozen": ~finite, "changed": jnp.sum(kept != state["kept"]).astype(jnp.int32)}
    return new_state, info


def kernel_filters(kernel: Array) -> Array:
    """(kh, kw, c_in, c) HWIO conv kernel -> (c, kh * kw * c_in) one filter per row."""
    return jnp.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)


def _update_fusion(params, fusion, epoch, num_epochs, criterion, t_start, t_end, k):
    t = temperature(jnp.asarray(epoch), num_epochs, t_start, t_end, k)
    flat_fusion = traverse_util.flatten_dict(unfreeze(fusion))
    flat_params = traverse_util.flatten_dict(unfreeze(params))
    layers = sorted({path[:-1] for path in flat_fusion})
    new_flat, info = {}, {}
    for layer in layers:
        kernel_path = layer + ("kernel",)
        if kernel_path not in flat_params:
            raise ValueError(f"fused layer {'/'.join(layer)} has no params[...]['kernel']")
        state = {name: flat_fusion[layer + (name,)] for name in ("matrix", "scores", "kept")}
        new_state, info["/".join(layer)] = update_layer(
            kernel_filters(flat_params[kernel_path]), state, t, criterion
        )
        new_flat.update({layer + (name,): value for name, value in new_state.items()})
    return traverse_util.unflatten_dict(new_flat), info


_update_fusion_jit = jax.jit(_update_fusion, static_argnames=("criterion", "t_start", "t_end", "k"))


def update_fusion(
    params: Any,
    fusion: Any,
    epoch,
    num_epochs,
    *,
    criterion: str = "reference",
    t_start: float = 1.0,
    t_end: float = 1e4,
    k: float = 1.0,
) -> tuple[dict, dict[str, dict[str, Array]]]:
    """Update the fusion state of every fused layer of a model for one epoch, in one jitted call.

    Call it before each epoch's training, as the published code does. The epoch and num_epochs
    are traced, so there is one compilation per model, not one per epoch.

    Args:
      params: the model's "params" collection; each fused layer's kernel is
        params[...path...]["kernel"] with shape (kh, kw, c_in, c).
      fusion: the model's "fusion" collection; the same paths hold {"matrix", "scores", "kept"}.
      epoch: the epoch about to be trained, 0-based.
      num_epochs: total epochs E of the schedule.
      criterion: "reference" (published, with its freeze rule) or "exact" (log-space KL).

    Returns:
      (new_fusion, info) where info maps "path/of/layer" -> {"frozen", "changed"}.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return _update_fusion_jit(params, fusion, epoch, num_epochs, criterion, t_start, t_end, k)
