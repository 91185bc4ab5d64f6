"""Slow, obviously-right references for the HARC solver tests (float64, one Kronecker product per token)."""

from __future__ import annotations

import torch

F64 = torch.float64


def token_hessian(r: torch.Tensor, hessian: str) -> torch.Tensor:
    if hessian == "full":
        return torch.diag(r) - torch.outer(r, r)
    if hessian == "diag":
        return torch.diag(r - r * r)
    return torch.eye(r.shape[0], dtype=r.dtype)


def dense_sigma(x: torch.Tensor, w_src: torch.Tensor, hessian: str) -> torch.Tensor:
    """Sigma_i = mean over tokens of H_i(x) kron x x^T, index (k*d + a, l*d + b)."""
    k, d = w_src.shape
    s = torch.zeros(k * d, k * d, dtype=F64)
    for xt in x.to(F64):
        r = torch.softmax(w_src.to(F64) @ xt, dim=0)
        s += torch.kron(token_hessian(r, hessian), torch.outer(xt, xt))
    return s / x.shape[0]


def dense_system(xs, ws, alpha: float, hessian: str):
    """(sum_i Sigma_reg,i, sum_i Sigma_reg,i w_i) with w = vec(W^T) = W.reshape(-1)."""
    k, d = ws[0].shape
    a = torch.zeros(k * d, k * d, dtype=F64)
    b = torch.zeros(k * d, dtype=F64)
    for x, w in zip(xs, ws):
        s = dense_sigma(x, w, hessian)
        s_reg = alpha * s + (1 - alpha) * torch.diag(torch.diag(s))
        a += s_reg
        b += s_reg @ w.to(F64).reshape(-1)
    return a, b


def dense_solution(xs, ws, alpha: float, hessian: str) -> torch.Tensor:
    a, b = dense_system(xs, ws, alpha, hessian)
    k, d = ws[0].shape
    return torch.linalg.solve(a, b).reshape(k, d)


def eq12_product(x: torch.Tensor, w_src: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sigma_reg,i w by App. A.3 Eq. 12, token by token (full Hessian); returns (K, d)."""
    out = torch.zeros(w.shape, dtype=F64)
    for xt in x.to(F64):
        r = torch.softmax(w_src.to(F64) @ xt, dim=0)
        h = torch.diag(r) - torch.outer(r, r)
        dense = torch.outer(xt, (w.to(F64) @ xt) @ h)  # x ((W x)^T H), (d, K)
        diag = torch.diag(xt * xt) @ w.to(F64).T @ torch.diag(torch.diag(h))  # diag(x*x) W^T diag(H)
        out += (alpha * dense + (1 - alpha) * diag).T  # vec of a (d, K) matrix = its transpose row-major
    return out / x.shape[0]


def exact_kl(xs, ws, w: torch.Tensor) -> float:
    total = 0.0
    for x, ws_i in zip(xs, ws):
        lr = torch.log_softmax(x.to(F64) @ ws_i.to(F64).T, dim=1)
        lm = torch.log_softmax(x.to(F64) @ w.to(F64).T, dim=1)
        total += float((lr.exp() * (lr - lm)).sum(1).mean())
    return total


def kl_gradient(xs, ws, w: torch.Tensor) -> torch.Tensor:
    w = w.to(F64).clone().requires_grad_(True)
    loss = 0.0
    for x, ws_i in zip(xs, ws):
        lr = torch.log_softmax(x.to(F64) @ ws_i.to(F64).T, dim=1)
        lm = torch.log_softmax(x.to(F64) @ w.T, dim=1)
        loss = loss + (lr.exp() * (lr - lm)).sum(1).mean()
    (g,) = torch.autograd.grad(loss, w)
    return g


def make_problem(num_tasks: int, k: int, d: int, tokens, seed: int = 0, spread: float = 1.0):
    """Random inputs with per-task offsets/scales and source routers that disagree."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, d, generator=gen, dtype=F64)
    xs, ws = [], []
    for i in range(num_tasks):
        scale = 0.5 + torch.rand(d, generator=gen, dtype=F64)
        shift = 0.3 * torch.randn(d, generator=gen, dtype=F64)
        xs.append(torch.randn(tokens[i], d, generator=gen, dtype=F64) * scale + shift)
        ws.append(base + spread * torch.randn(k, d, generator=gen, dtype=F64))
    init = sum(ws) / num_tasks
    return xs, ws, init
