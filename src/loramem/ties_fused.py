"""TIES straight from LoRA factors into merged weights, one pass over each weight (numba, CPU).

`merge.ties` works on dense deltas: it forms s * B @ A for every module, trims, stacks, elects and averages
them, some fifteen passes over memory per layer. Here a layer's merged weight W + TIES(dW_1..dW_n) is written
row by row from the factors: each module's delta row is recomputed from its rank-r factors (r multiply-adds
per entry, no dense delta stored), trimmed at the module's threshold, and elected and averaged in row buffers.

The trimming threshold of a module (the k-th largest |dW| of each layer) depends on that module alone, so it
is computed once per module and density and kept in a cache: a module set that shares modules with an
earlier one only pays for the merge pass. The same compiled code computes the deltas for the thresholds and
for the merge, so an entry at the threshold compares equal in both. A layer whose threshold is tied (more
than k entries with the k-th magnitude) goes through `merge.ties` instead, which keeps exactly k.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

from loramem.merge import Factors, MergeCache, _check, _check_density, _check_sign_method, factor_shapes, ties

Thresholds = dict[str, float | None]  # weight name -> k-th largest |dW|, or None when tied at it


_JIT = {"cache": True, "error_model": "numpy"}  # numpy's error model: no zero-division branch in the loops


@numba.njit(inline="always", **_JIT)
def _delta_row(a: np.ndarray, b: np.ndarray, row: int, out: np.ndarray) -> None:
    """out = (s B)[row] @ A: one row of a module's delta, summed over the rank in order (1-D views, so that
    each loop is a vector loop)."""
    out[:] = 0.0
    for k in range(a.shape[0]):
        coef, a_row = b[row, k], a[k]
        for c in range(out.shape[0]):
            out[c] += coef * a_row[c]


@numba.njit(nogil=True, **_JIT)
def _abs_delta(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = |(s B) @ A|, without the GIL: layers run on a thread pool (see `thresholds`)."""
    for row in range(b.shape[0]):
        out_row = out[row]
        _delta_row(a, b, row, out_row)
        for c in range(out_row.shape[0]):
            out_row[c] = abs(out_row[c])


@numba.njit(parallel=True, **_JIT)
def _ties_rows(weight, a, b, weights, thresholds, by_count, out):
    """out = weight + TIES of the modules' deltas (trim at each threshold, weight, elect a sign, disjoint mean).
    a: (n, r, cols) and b: (n, rows, r), ranks zero-padded to the largest (a zero term adds exactly nothing).
    Loops run module-outer, column-inner over 1-D row views: branch-free vector loops."""
    n, cols = a.shape[0], weight.shape[1]
    for row in numba.prange(weight.shape[0]):
        kept = np.empty((n, cols), np.float32)
        score = np.zeros(cols, np.float32)
        for i in range(n):
            kept_row, threshold, weight_i = kept[i], thresholds[i], weights[i]
            _delta_row(a[i], b[i], row, kept_row)
            for c in range(cols):
                v = kept_row[c]
                kept_row[c] = weight_i * v if abs(v) >= threshold else np.float32(0.0)
            if by_count:
                for c in range(cols):
                    score[c] += np.float32(kept_row[c] > 0) - np.float32(kept_row[c] < 0)
            else:
                for c in range(cols):
                    score[c] += kept_row[c]
        total = np.zeros(cols, np.float32)
        agreeing = np.zeros(cols, np.float32)
        for i in range(n):
            kept_row = kept[i]
            for c in range(cols):
                v = kept_row[c]
                agrees = (v > 0) if score[c] >= 0 else (v < 0)  # a score of 0 elects +; zeros never agree
                total[c] += v if agrees else np.float32(0.0)
                agreeing[c] += np.float32(1.0) if agrees else np.float32(0.0)
        weight_row, out_row = weight[row], out[row]
        for c in range(cols):
            out_row[c] = weight_row[c] + total[c] / max(agreeing[c], np.float32(1.0))  # total is 0 where none agree


def _numpy_factors(factors: Factors, name: str, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A and s * B as fp32 arrays, zero-padded to `rank`."""
    a, b, scale = factors[name]
    a, b = a.detach().float(), b.detach().float() * scale
    pad = (rank or a.shape[0]) - a.shape[0]
    if pad:
        a, b = torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return np.ascontiguousarray(a.numpy()), np.ascontiguousarray(b.numpy())


def thresholds(factors: Factors, density: float) -> Thresholds:
    """Each layer's trimming threshold for one module: the k-th largest |s B @ A|, k = floor(density * size)
    as in `merge._trim` (0 at density 1: everything is kept); None where more than k entries share it. Layers
    run on a thread pool (the delta kernel and numpy's partition both release the GIL)."""
    if density >= 1:
        return dict.fromkeys(factors, 0.0)
    largest = max(b.shape[0] * a.shape[1] for a, b, _ in factors.values())
    local = threading.local()  # one buffer per thread, reused: a fresh array per layer cost as much in page faults

    def threshold(name: str) -> float | None:
        if not hasattr(local, "buffer"):
            local.buffer = np.empty(largest, np.float32)
        a, b = _numpy_factors(factors, name)
        magnitude = local.buffer[: b.shape[0] * a.shape[1]]
        _abs_delta(a, b, magnitude.reshape(b.shape[0], a.shape[1]))
        k = max(1, int(density * magnitude.size + 1e-9))
        magnitude.partition(magnitude.size - k)
        cut = magnitude[magnitude.size - k]
        return float(cut) if np.count_nonzero(magnitude >= cut) == k else None

    with ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS) as pool:
        return dict(zip(factors, pool.map(threshold, factors)))


def ties_merged_weights(params: dict[str, torch.nn.Parameter], factors: list[Factors], weights: list[float] | None,
                        density: float, sign_method: str = "total", keys: list | None = None,
                        cache: MergeCache | None = None) -> dict[str, torch.Tensor]:
    """W + TIES(dW_1..dW_n) for every weight in `params` (fp32 CPU weights the modules adapt). With `keys` naming
    the modules, each module's thresholds are kept in `cache` by key and density."""
    ws = _check([factor_shapes(f) for f in factors], weights)
    _check_density(density)
    _check_sign_method(sign_method)
    if cache is not None and keys is None:
        raise ValueError("a threshold cache needs keys that name the modules")
    cuts = [cache.get_or_compute((key, density), lambda f=f: thresholds(f, density)) if cache is not None
            else thresholds(f, density) for f, key in zip(factors, keys or [None] * len(factors))]
    out = {}
    for name, p in params.items():
        if any(cut[name] is None for cut in cuts):  # a tie at the threshold: the dense path keeps exactly k
            dense = [{name: s * b.float() @ a.float()} for f in factors for a, b, s in [f[name]]]
            out[name] = p.detach() + ties(dense, ws, density=density, sign_method=sign_method)[name]
            continue
        rank = max(f[name][0].shape[0] for f in factors)
        pairs = [_numpy_factors(f, name, rank) for f in factors]
        weight = p.detach().numpy()
        merged = np.empty_like(weight)
        _ties_rows(weight, np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs]), np.asarray(ws, np.float32),
                   np.asarray([cut[name] for cut in cuts], np.float32), sign_method == "frequency", merged)
        out[name] = torch.from_numpy(merged)
    return out
