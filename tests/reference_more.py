"""Float64 references of the added baselines, written from their formulas in NumPy (loops where the
library vectorises), independent of mergeflow's kernels. Task lists are in canonical order (tests
sort them as the engine does where the order matters)."""

from __future__ import annotations

import re

import numpy as np
import torch

Sd = dict[str, torch.Tensor]


def _np(sd: Sd) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in sd.items() if v.is_floating_point()}


def _out(arrays: dict[str, np.ndarray], base: Sd) -> Sd:
    """Float results as tensors, plus θ0's non-float keys (copied through by every method)."""
    ints = {k: v for k, v in base.items() if not v.is_floating_point()}
    return ints | {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def magmax(base: Sd, tuned: list[Sd], alpha: float) -> Sd:
    b, ts = _np(base), [_np(t) for t in tuned]
    out = {}
    for key, theta0 in b.items():
        taus = np.stack([t[key] - theta0 for t in ts])
        flat = taus.reshape(len(ts), -1)
        chosen = np.empty(flat.shape[1])
        for i in range(flat.shape[1]):
            best = 0
            for t in range(1, len(ts)):
                if abs(flat[t, i]) >= abs(flat[best, i]):
                    best = t
            chosen[i] = flat[best, i]
        out[key] = theta0 + alpha * chosen.reshape(theta0.shape)
    return _out(out, base)


def breadcrumbs_official(base: Sd, tuned: list[Sd], density: float, gamma: float, scaling: float) -> Sd:
    b, ts = _np(base), [_np(t) for t in tuned]
    out = {}
    for key, theta0 in b.items():
        total = np.zeros_like(theta0)
        for t in ts:
            tau = t[key] - theta0
            if tau.ndim == 0:
                total += tau
                continue
            rows = tau.reshape(-1, tau.shape[-1]).copy()
            n = rows.shape[1]
            for row in rows:
                order = np.argsort(-np.abs(row), kind="stable")
                keep = np.zeros(n, dtype=bool)
                keep[order[int(n * gamma) : int(n * gamma) + int(n * density)]] = True
                row[~keep] = 0.0
            total += rows.reshape(tau.shape)
        out[key] = theta0 + scaling * total
    return _out(out, base)


def breadcrumbs_mergekit(base: Sd, tuned: list[Sd], density: float, gamma: float, scaling: float, ties: bool) -> Sd:
    b, ts = _np(base), [_np(t) for t in tuned]
    out = {}
    for key, theta0 in b.items():
        masked = []
        for t in ts:
            tau = (t[key] - theta0).reshape(-1)
            n = tau.size
            target = int(density * n)
            n_bot = max(0, n - target - int(gamma * n))
            order = np.argsort(np.abs(tau).astype(np.float32), kind="stable")
            keep = np.zeros(n, dtype=bool)
            keep[order[n_bot : n_bot + target]] = True
            masked.append(np.where(keep, tau, 0.0) if density < 1 else tau)
        stack = np.stack(masked)
        if ties:
            majority = np.where(stack.sum(axis=0) >= 0, 1.0, -1.0)
            merged = (stack * (np.sign(stack) == majority)).sum(axis=0)
        else:
            merged = stack.sum(axis=0)
        out[key] = theta0 + scaling * merged.reshape(theta0.shape)
    return _out(out, base)


def tsv_c(base: Sd, tuned: list[Sd], reduction: float) -> list[Sd]:
    b, ts = _np(base), [_np(t) for t in tuned]
    outs = []
    for t in ts:
        out = {}
        for key, theta0 in b.items():
            tau = t[key] - theta0
            if tau.ndim == 2:
                u, s, vt = np.linalg.svd(tau, full_matrices=False)
                k = int(len(s) * reduction)
                tau = (u[:, :k] * s[:k]) @ vt[:k]
            out[key] = theta0 + tau
        outs.append(_out(out, base))
    return outs


def tall_masks(base: Sd, tuned: list[Sd], lambdas: list[float]) -> list[Sd]:
    b, ts = _np(base), [_np(t) for t in tuned]
    outs = []
    for t, lam in zip(ts, lambdas, strict=True):
        out = {}
        for key, theta0 in b.items():
            total = sum(s[key] - theta0 for s in ts)
            tau = t[key] - theta0
            out[key] = theta0 + np.where(np.abs(tau) > lam * np.abs(total - tau), total, 0.0)
        outs.append(_out(out, base))
    return outs


def emr(base: Sd, tuned: list[Sd]) -> list[Sd]:
    """Rescalers summed in float32 key by key (sorted keys), as the reference code accumulates them."""
    b, ts = _np(base), [_np(t) for t in tuned]
    keys = sorted(b)
    unified, masks = {}, {}
    num = np.zeros(len(ts), dtype=np.float32)
    den = np.zeros(len(ts), dtype=np.float32)
    for key in keys:
        taus = np.stack([t[key] - b[key] for t in ts])
        flag = np.where(taus.sum(axis=0) > 0, 1.0, -1.0)
        mask = taus * flag > 0
        uni = flag * np.max(np.abs(taus * mask), axis=0)
        unified[key], masks[key] = uni, mask
        for i in range(len(ts)):  # float32 sums, each addition done in float64 and rounded (torch's 0-dim +=)
            num[i] = np.float32(float(num[i]) + float(np.abs(taus[i]).mean()))
            den[i] = np.float32(float(den[i]) + float(np.abs(uni * mask[i]).mean()))
    rescalers = num / den
    return [
        _out({k: b[k] + unified[k] * masks[k][i] * float(rescalers[i]) for k in keys}, base) for i in range(len(ts))
    ]


def lines_ta(base: Sd, tuned: list[Sd], beta: float, depth: int) -> Sd:
    b, ts = _np(base), [_np(t) for t in tuned]
    out = {}
    for key, theta0 in b.items():
        layers = [int(m) for m in re.findall(r"(?=\.(\d+)\.)", key) if int(m) < depth]
        layer = min(layers) if layers else None  # the smallest ℓ whose ".ℓ." occurs
        scale = 1.0 / len(ts) + (beta * layer / (depth - 1) if layer is not None else 0.0)
        out[key] = theta0 + scale * sum(t[key] - theta0 for t in ts)
    return _out(out, base)


def svc(base: Sd, tuned: list[Sd], merged: Sd, alpha: float) -> Sd:
    b, ts, m = _np(base), [_np(t) for t in tuned], _np(merged)
    out = {}
    for key, theta0 in b.items():
        if theta0.ndim != 2:
            out[key] = m[key]
            continue
        d = m[key] - theta0
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        gamma = np.empty(len(s))
        for r in range(len(s)):
            total = 0.0
            for t in ts:
                a = u[:, r] @ (t[key] - theta0)
                denom = max(float(a @ a), 1e-12)
                ratio = float((u[:, r] @ d) @ a) / denom
                if np.isnan(ratio) or ratio == -np.inf:
                    ratio = alpha
                total += max(alpha, ratio)
            gamma[r] = len(ts) / total
        out[key] = theta0 + (u * (gamma * s)) @ vt
    return _out(out, base)


def wudi(base: Sd, tuned: list[Sd], steps: int, lr: float) -> Sd:
    """Autograd on the loss itself with torch.optim.Adam (as FusionBench drives it), every 2-D key."""
    out = {k: v for k, v in base.items() if not v.is_floating_point()}
    for key, theta0 in base.items():
        if not theta0.is_floating_point():
            continue
        theta0 = theta0.double()
        taus = [t[key].double() - theta0 for t in tuned]
        if theta0.ndim != 2:
            out[key] = theta0 + sum(taus) / len(taus)
            continue
        x = torch.nn.Parameter(sum(taus).clone())
        optimizer = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.999), eps=1e-8)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum(((x - tau) @ tau.T).pow(2).sum() / tau.pow(2).sum() for tau in taus)
            loss.backward()
            optimizer.step()
        out[key] = theta0 + x.detach()
    return out


def pcb(base: Sd, tuned: list[Sd], variant: str, c: float, r: float, scaling: float) -> Sd:
    """The whole model as one row per task (sorted keys), every statistic from full sorts."""
    b, ts = _np(base), [_np(t) for t in tuned]
    keys = sorted(b)
    rows = np.stack([np.concatenate([(t[k] - b[k]).reshape(-1) for k in keys]) for t in ts])
    num, d = rows.shape

    def clamp(x: np.ndarray, low: float, high: float) -> np.ndarray:
        ordered = np.sort(x)
        return np.clip(x, ordered[int(d * low)], ordered[int(d * (1 - high) - 1)])

    def mm(x: np.ndarray) -> np.ndarray:
        return (x - x.min()) / (x.max() - x.min())

    a = np.stack([clamp(np.abs(row), c, c) for row in rows])
    signed = np.sign(rows) * a
    normed = np.stack([mm(x) for x in a])
    intra = np.exp(num * normed**2)
    if variant == "reference":
        inter = np.tanh(rows * rows.sum(axis=0))
    elif variant == "pairwise":
        n = np.sign(rows) * normed
        inter = np.stack([sum(np.tanh(n[i] * n[j]) for j in range(num)) for i in range(num)])
    else:
        n = np.sign(rows) * normed
        inter = np.tanh(rows * n.sum(axis=0))
    scores = intra * inter
    kept = np.stack([mm(clamp(p, 1 - r, 0.0)) for p in scores])
    merged = scaling * (signed * kept).sum(axis=0) / np.maximum(kept.sum(axis=0), 1e-12)
    out, offset = {}, 0
    for k in keys:
        size = b[k].size
        out[k] = b[k] + merged[offset : offset + size].reshape(b[k].shape)
        offset += size
    return _out(out, base)
