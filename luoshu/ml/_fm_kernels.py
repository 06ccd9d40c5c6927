"""Compiled training epochs of the factorization machines: forward, backward and sparse AdaGrad fused per batch.

As torch expressions a mini-batch costs a CSR slice, two sparse products each way, a transpose to COO and a
dense AdaGrad over the whole table (~30 kernel launches and a table-sized pass per 256 rows); compiled by
numba, one pass over the batch's non-zeros computes the scores (Rendle's O(nnz k) form for FM, the pairwise
sum over a row's non-zeros for FFM), the residuals and the gradients, and AdaGrad then updates only the
touched features' rows (as the parameter-server path and libFM/libFFM do: an untouched row has no data
gradient, so its regularisation is applied when it is next touched). `cache=True`: compiled once per machine.

Tasks: 0 regression (squared loss / 2), 1 binary logistic (one score), 2 softmax over K scores; `target` is
(n, K) float64 (the value, the 0/1 label, or the one-hot class). Scores of a batch come from the parameters
at the batch's start (a mini-batch gradient, divided by the batch's row count); the return value is the
summed loss of the epoch's rows.
"""

from __future__ import annotations

import math

import numba
import numpy as np

REGRESSION, BINARY, SOFTMAX = 0, 1, 2


@numba.njit(nogil=True, cache=True, inline="always")
def _loss_residual(task, Z, target, r, R):  # pragma: no cover - compiled
    """Row r's loss for scores Z (K,), with dLoss/dZ written to R."""
    k_out = Z.shape[0]
    if task == REGRESSION:
        res = Z[0] - target[r, 0]
        R[0] = res
        return 0.5 * res * res
    if task == BINARY:
        z = Z[0]
        t = target[r, 0]
        R[0] = 1.0 / (1.0 + math.exp(-z)) - t
        return max(z, 0.0) + math.log1p(math.exp(-abs(z))) - t * z
    top = Z[0]
    for c in range(1, k_out):
        top = max(top, Z[c])
    total = 0.0
    for c in range(k_out):
        R[c] = math.exp(Z[c] - top)
        total += R[c]
    lse = top + math.log(total)
    loss = lse
    for c in range(k_out):
        R[c] = R[c] / total - target[r, c]
        loss -= Z[c] * target[r, c]
    return loss


@numba.njit(nogil=True, cache=True, inline="always")
def _adagrad(p, acc, g, lr):  # pragma: no cover - compiled
    acc += g * g
    return p - lr * g / (math.sqrt(acc) + 1e-10), acc


@numba.njit(nogil=True, cache=True, inline="always")
def _touch(j, seen, touched, n_touched):  # pragma: no cover - compiled
    """Records feature j as touched by this batch (once); the new count of touched features."""
    if seen[j]:
        return n_touched
    seen[j] = True
    touched[n_touched] = j
    return n_touched + 1


@numba.njit(nogil=True, cache=True, inline="always")
def _step_linear(j, w, acc_w, g_w, reg_linear, lr):  # pragma: no cover - compiled
    """AdaGrad on feature j's linear weights (L2 `reg_linear`); their gradient zeroed for the next batch."""
    for c in range(w.shape[1]):
        w[j, c], acc_w[j, c] = _adagrad(w[j, c], acc_w[j, c], g_w[j, c] + reg_linear * w[j, c], lr)
        g_w[j, c] = 0.0


@numba.njit(nogil=True, cache=True)
def fm_epoch(
    indptr, indices, data, order, batch_size, target, task, w0, w, V, acc_w0, acc_w, acc_V, lr, reg_linear, reg_v
):  # pragma: no cover - compiled
    """One epoch of a 2-way FM over rows `order` of a CSR matrix; w0 (K,), w (d, K), V (K, d, k) in place."""
    n = order.shape[0]
    k_out, d, k = V.shape
    g_w0 = np.zeros(k_out)
    g_w = np.zeros((d, k_out))
    g_V = np.zeros((k_out, d, k))
    seen = np.zeros(d, np.bool_)
    touched = np.empty(d, np.int64)
    S = np.empty((k_out, k))
    Z = np.empty(k_out)
    R = np.empty(k_out)
    total = 0.0
    for start in range(0, n, batch_size):
        rows = np.sort(order[start : min(start + batch_size, n)])
        m = rows.shape[0]
        n_touched = 0
        g_w0[:] = 0.0
        for r in rows:
            a, b = indptr[r], indptr[r + 1]
            for c in range(k_out):
                z = w0[c]
                sq = 0.0
                S[c, :] = 0.0
                for p in range(a, b):
                    j = indices[p]
                    x = data[p]
                    z += x * w[j, c]
                    for f in range(k):
                        vx = V[c, j, f] * x
                        S[c, f] += vx
                        sq += vx * vx
                s2 = 0.0
                for f in range(k):
                    s2 += S[c, f] * S[c, f]
                Z[c] = z + 0.5 * (s2 - sq)
            total += _loss_residual(task, Z, target, r, R)
            for c in range(k_out):
                R[c] /= m
                g_w0[c] += R[c]
            for p in range(a, b):
                j = indices[p]
                x = data[p]
                n_touched = _touch(j, seen, touched, n_touched)
                for c in range(k_out):
                    rx = R[c] * x
                    g_w[j, c] += rx
                    for f in range(k):  # d/dv_jf of 0.5 (S_f^2 - sum v^2 x^2) = x (S_f - v_jf x)
                        g_V[c, j, f] += rx * (S[c, f] - V[c, j, f] * x)
        for c in range(k_out):
            w0[c], acc_w0[c] = _adagrad(w0[c], acc_w0[c], g_w0[c], lr)
        for t in range(n_touched):
            j = touched[t]
            seen[j] = False
            _step_linear(j, w, acc_w, g_w, reg_linear, lr)
            for c in range(k_out):
                for f in range(k):
                    g = g_V[c, j, f] + reg_v * V[c, j, f]
                    V[c, j, f], acc_V[c, j, f] = _adagrad(V[c, j, f], acc_V[c, j, f], g, lr)
                    g_V[c, j, f] = 0.0
    return total


@numba.njit(nogil=True, cache=True)
def ffm_epoch(
    indptr, indices, data, fields, order, batch_size, target, task, w0, w, V, acc_w0, acc_w, acc_V, lr, reg_linear,
    reg_v,
):  # pragma: no cover - compiled
    """One epoch of a field-aware FM; V (d, F, K, k): v_{i, g}. Score: sum over a row's non-zero pairs p < q of
    <v_{i_p, F(i_q)}, v_{i_q, F(i_p)}> x_p x_q (O(nnz^2 k) per row, libFFM's loop)."""
    n = order.shape[0]
    d, n_fields, k_out, k = V.shape
    g_w0 = np.zeros(k_out)
    g_w = np.zeros((d, k_out))
    g_V = np.zeros((d, n_fields, k_out, k))
    seen = np.zeros(d, np.bool_)
    touched = np.empty(d, np.int64)
    Z = np.empty(k_out)
    R = np.empty(k_out)
    total = 0.0
    for start in range(0, n, batch_size):
        rows = np.sort(order[start : min(start + batch_size, n)])
        m = rows.shape[0]
        n_touched = 0
        g_w0[:] = 0.0
        for r in rows:
            a, b = indptr[r], indptr[r + 1]
            for c in range(k_out):
                Z[c] = w0[c]
            for p in range(a, b):
                i = indices[p]
                for c in range(k_out):
                    Z[c] += data[p] * w[i, c]
                for q in range(p + 1, b):
                    j = indices[q]
                    xx = data[p] * data[q]
                    fi, fj = fields[i], fields[j]
                    for c in range(k_out):
                        dot = 0.0
                        for f in range(k):
                            dot += V[i, fj, c, f] * V[j, fi, c, f]
                        Z[c] += dot * xx
            total += _loss_residual(task, Z, target, r, R)
            for c in range(k_out):
                R[c] /= m
                g_w0[c] += R[c]
            for p in range(a, b):
                i = indices[p]
                n_touched = _touch(i, seen, touched, n_touched)
                for c in range(k_out):
                    g_w[i, c] += R[c] * data[p]
                for q in range(p + 1, b):
                    j = indices[q]
                    xx = data[p] * data[q]
                    fi, fj = fields[i], fields[j]
                    for c in range(k_out):
                        rxx = R[c] * xx
                        for f in range(k):
                            g_V[i, fj, c, f] += rxx * V[j, fi, c, f]
                            g_V[j, fi, c, f] += rxx * V[i, fj, c, f]
        for c in range(k_out):
            w0[c], acc_w0[c] = _adagrad(w0[c], acc_w0[c], g_w0[c], lr)
        for t in range(n_touched):
            i = touched[t]
            seen[i] = False
            _step_linear(i, w, acc_w, g_w, reg_linear, lr)
            for g_field in range(n_fields):
                for c in range(k_out):
                    for f in range(k):
                        g = g_V[i, g_field, c, f] + reg_v * V[i, g_field, c, f]
                        V[i, g_field, c, f], acc_V[i, g_field, c, f] = _adagrad(
                            V[i, g_field, c, f], acc_V[i, g_field, c, f], g, lr
                        )
                        g_V[i, g_field, c, f] = 0.0
    return total
