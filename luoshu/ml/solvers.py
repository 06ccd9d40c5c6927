"""Deterministic optimisers for convex `luoshu.ml` problems, on torch float64 kernels: L-BFGS and FISTA.

Both take a flat parameter vector and a function returning `(value, gradient)`; no
autograd is involved (every model writes its own gradient). They stop on the largest
gradient (or gradient-mapping) entry, so `tol` means the same thing for every model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FunGrad = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


def lbfgs(
    fun_grad: FunGrad, x0: torch.Tensor, *, max_iter: int = 500, tol: float = 1e-6, memory: int = 20
) -> tuple[torch.Tensor, int]:
    """Minimises a smooth function; returns `(x, iterations)`. Backtracking Armijo line search."""
    x = x0.clone()
    f, g = fun_grad(x)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[float] = []
    it = 0
    for it in range(1, max_iter + 1):
        if float(g.abs().max()) <= tol:
            return x, it - 1
        # two-loop recursion: d = -H g
        q = g.clone()
        alphas = []
        for s, y, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a = rho * float(s @ q)
            alphas.append(a)
            q -= a * y
        if s_hist:
            gamma = float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
            q *= gamma
        else:
            q *= 1.0 / max(float(g.abs().max()), 1.0)  # a first step no longer than 1 per coordinate
        for (s, y, rho), a in zip(zip(s_hist, y_hist, rho_hist), reversed(alphas)):
            b = rho * float(y @ q)
            q += (a - b) * s
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            s_hist.clear(), y_hist.clear(), rho_hist.clear()
            d = -g
            slope = float(g @ d)
        step = 1.0
        for _ in range(60):
            x_new = x + step * d
            f_new, g_new = fun_grad(x_new)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            return x, it  # no decrease possible at machine precision
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12 * float(s @ s):  # keep the curvature pair only when it is positive
            s_hist.append(s), y_hist.append(y), rho_hist.append(1.0 / sy)
            if len(s_hist) > memory:
                s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        if abs(f - f_new) <= 1e-16 * max(abs(f), 1.0) and float(s.abs().max()) == 0.0:
            x, f, g = x_new, f_new, g_new
            break
        x, f, g = x_new, f_new, g_new
    return x, it


def fista(
    fun_grad: FunGrad,
    prox: Callable[[torch.Tensor, float], torch.Tensor],
    x0: torch.Tensor,
    *,
    lipschitz: float,
    max_iter: int = 5000,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, int]:
    """Minimises smooth + non-smooth by accelerated proximal gradient with backtracking and adaptive restart.

    `prox(v, step)` is the proximal map of the non-smooth part (a projection for a box
    constraint). Stops when the gradient mapping `(x - prox(x - step g)) / step` is below
    `tol` in every entry.
    """
    x = x0.clone()
    z = x.clone()
    t = 1.0
    lip = max(float(lipschitz), 1e-12)
    it = 0
    for it in range(1, max_iter + 1):
        fz, gz = fun_grad(z)
        while True:
            step = 1.0 / lip
            x_new = prox(z - step * gz, step)
            diff = x_new - z
            f_new, _ = fun_grad(x_new)
            if f_new <= fz + float(gz @ diff) + 0.5 * lip * float(diff @ diff) + 1e-12 * abs(fz):
                break
            lip *= 2.0
        if float(diff.abs().max()) * lip <= tol:
            return x_new, it
        if float((z - x_new) @ (x_new - x)) > 0:  # momentum points uphill: restart it
            t = 1.0
        t_new = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
        z = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x, it


def spectral_norm_sq(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor], torch.Tensor],
    n_cols: int,
    iters: int = 50,
) -> float:
    """The largest eigenvalue of A^T A by power iteration (an upper estimate: +1%)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n_cols, dtype=torch.float64, generator=gen)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = rmatvec(matvec(v))
        lam = float(w.norm())
        if lam == 0.0:
            return 0.0
        v = w / lam
    return lam * 1.01
