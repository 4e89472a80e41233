"""Float64 reference merges written directly from the formulas in shared/reference/methods.md.

Deliberately naive and independent of the library: whole state dicts in memory, full SVDs, full-size
zero-initialised blocks, the reference codes' rounding rules. Inputs are dicts of tensors.
"""

from __future__ import annotations

import re

import torch

Sd = dict[str, torch.Tensor]

_BERT = re.compile(
    r"layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$"
)


def cart_selected(key: str, tensor: torch.Tensor) -> bool:
    if tensor.ndim != 2:
        return False
    if ("attn" in key or "mlp" in key) and "ln" not in key and "bias" not in key:
        return True
    return bool(_BERT.search(key))


def _f64(sd: Sd) -> Sd:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def _floats(sd: Sd) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


def weight_average(base: Sd, tuned: list[Sd]) -> Sd:
    base, tuned = _f64(base), [_f64(t) for t in tuned]
    out = dict(base)
    for k in _floats(base):
        out[k] = base[k] + sum(t[k] - base[k] for t in tuned) / len(tuned)
    return out


def task_arithmetic(base: Sd, tuned: list[Sd], scaling: float) -> Sd:
    base, tuned = _f64(base), [_f64(t) for t in tuned]
    out = dict(base)
    for k in _floats(base):
        out[k] = base[k] + scaling * sum(t[k] - base[k] for t in tuned)
    return out


def _ties_vectors(taus: torch.Tensor, density: float, merge: str) -> torch.Tensor:
    """taus: T × d. Trim per row, elect sign, disjoint merge."""
    d = taus.shape[1]
    keep = d - int(d * density)
    trimmed = torch.zeros_like(taus)
    for t in range(taus.shape[0]):
        if keep <= 0:
            trimmed[t] = taus[t]
            continue
        threshold = taus[t].abs().sort().values[keep - 1]  # keep-th smallest
        trimmed[t] = torch.where(taus[t].abs() >= threshold, taus[t], 0.0)
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * agree
    if merge == "sum":
        return sel.sum(0)
    if merge == "mean":
        return sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    return sel.abs().max(0).values * sign


def ties(base: Sd, tuned: list[Sd], density: float, merge: str, scope: str, scaling: float) -> Sd:
    base, tuned = _f64(base), [_f64(t) for t in tuned]
    keys = _floats(base)
    out = dict(base)
    if scope == "global":
        taus = torch.stack([torch.cat([(t[k] - base[k]).flatten() for k in keys]) for t in tuned])
        merged = _ties_vectors(taus, density, merge)
        offset = 0
        for k in keys:
            n = base[k].numel()
            out[k] = base[k] + scaling * merged[offset : offset + n].reshape(base[k].shape)
            offset += n
    else:
        for k in keys:
            taus = torch.stack([(t[k] - base[k]).flatten() for t in tuned])
            out[k] = base[k] + scaling * _ties_vectors(taus, density, merge).reshape(base[k].shape)
    return out


def consensus(base: Sd, tuned: list[Sd], lambdas: list[float], min_tasks: int, scaling: float) -> Sd:
    base, tuned = _f64(base), [_f64(t) for t in tuned]
    out = dict(base)
    for k in _floats(base):
        taus = [t[k] - base[k] for t in tuned]
        total = sum(taus)
        votes = sum((tau.abs() > lam * (total - tau).abs()).long() for tau, lam in zip(taus, lambdas, strict=True))
        out[k] = base[k] + scaling * total * (votes >= min_tasks)
    return out


def _svd_k(a: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def cart(base: Sd, tuned: list[Sd], scaling: float, rank_ratio: float, per_task: bool = False) -> Sd | list[Sd]:
    avg = weight_average(base, tuned)
    tuned = [_f64(t) for t in tuned]
    outs = [dict(avg) for _ in tuned] if per_task else [dict(avg)]
    for k in _floats(avg):
        if not cart_selected(k, avg[k]) or rank_ratio == 0.0:
            continue
        rank = max(1, int(rank_ratio * min(avg[k].shape)))
        parts = [_svd_k(t[k] - avg[k], rank) for t in tuned]
        if per_task:
            for out, part in zip(outs, parts, strict=True):
                out[k] = avg[k] + scaling * part
        else:
            outs[0][k] = avg[k] + scaling * sum(parts)
    return outs if per_task else outs[0]


def _polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def _matrix_keys(sd: Sd) -> list[str]:
    return [k for k in _floats(sd) if sd[k].ndim == 2]


def _singular_merge(base: Sd, tuned: list[Sd], scaling: float, matrix_fn) -> Sd:  # type: ignore[no-untyped-def]
    base, tuned = _f64(base), [_f64(t) for t in tuned]
    out = dict(base)
    matrices = set(_matrix_keys(base))
    for k in _floats(base):
        taus = [t[k] - base[k] for t in tuned]
        merged = matrix_fn(taus) if k in matrices else sum(taus) / len(taus)
        out[k] = base[k] + scaling * merged
    return out


def tsv(base: Sd, tuned: list[Sd], scaling: float) -> Sd:
    def matrix(taus: list[torch.Tensor]) -> torch.Tensor:
        m, n = taus[0].shape
        mn, T = min(m, n), len(taus)
        r = int(mn / T)
        u_cat = torch.zeros(m, mn, dtype=torch.float64)
        s_cat = torch.zeros(mn, dtype=torch.float64)
        vh_cat = torch.zeros(mn, n, dtype=torch.float64)
        for i, tau in enumerate(taus):
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            u_cat[:, i * r : (i + 1) * r] = u[:, :r]
            s_cat[i * r : (i + 1) * r] = s[:r]
            vh_cat[i * r : (i + 1) * r] = vh[:r]
        return _polar(u_cat) @ torch.diag(s_cat) @ _polar(vh_cat)

    return _singular_merge(base, tuned, scaling, matrix)


def iso_c(base: Sd, tuned: list[Sd], scaling: float) -> Sd:
    def matrix(taus: list[torch.Tensor]) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
        return s.mean() * u @ vh

    return _singular_merge(base, tuned, scaling, matrix)


def iso_cts(base: Sd, tuned: list[Sd], scaling: float, common_fraction: float) -> Sd:
    def matrix(taus: list[torch.Tensor]) -> torch.Tensor:
        m, n = taus[0].shape
        mn, T = min(m, n), len(taus)
        cs = int(mn * common_fraction)
        ts = round((mn - cs) / T) * T
        ts = ts if ts <= mn else (mn // T) * T  # documented guard: the reference would slice with cs < 0
        cs = mn - ts
        nt = int((mn - cs) / T)
        u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
        u_c, s_c, vh_c = u[:, :cs], s[:cs], vh[:cs]
        u_all = torch.zeros(m, mn, dtype=torch.float64)
        s_all = torch.zeros(mn, dtype=torch.float64)
        vh_all = torch.zeros(mn, n, dtype=torch.float64)
        for t, tau in enumerate(taus):
            w = tau - u_c @ u_c.T @ tau
            uw, sw, vhw = torch.linalg.svd(w, full_matrices=False)
            u_all[:, t * nt : (t + 1) * nt] = uw[:, :nt]
            s_all[t * nt : (t + 1) * nt] = sw[:nt]
            vh_all[t * nt : (t + 1) * nt] = vhw[:nt]
        u_all[:, T * nt : T * nt + cs] = u_c
        s_all[T * nt : T * nt + cs] = s_c
        vh_all[T * nt : T * nt + cs] = vh_c
        return s_all.mean() * _polar(u_all) @ _polar(vh_all)

    return _singular_merge(base, tuned, scaling, matrix)
