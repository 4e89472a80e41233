#!/usr/bin/env python3
"""Generate parity fixtures for mergeflow's extra merge methods from the REFERENCE code.

Runs OUTSIDE the project venv, in a scratch venv with the reference libraries:

    python3.11 -m venv /tmp/peers
    /tmp/peers/bin/pip install torch==2.14.1 fusion-bench==0.2.33 mergekit==0.1.5 safetensors
    /tmp/peers/bin/python tests/parity/generate.py [--mirror /work/.mirror] [--only magmax,emr,...]

Official (non-PyPI) reference repos are read from git mirrors (bare repos at
<mirror>/<owner>+<name>/repo, as produced by the `fetch` tool); the needed source files are
read with `git show <commit>:<path>` and executed from that text (see `load_from_git`), never
copied into the project.

Writes tests/parity/data/*.safetensors and tests/parity/cases.json. Deterministic (fixed seed,
CPU, single thread).
"""

# ruff: noqa: T201  (a script: progress goes to stdout)
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
SEED = 20261202
T = 3

# commit pins (must match /work/shared/reference/methods-more.md)
COMMITS = {
    "rezazzr/breadcrumbs": "f89fc664a171df2b90567aa1313ec7be677f2669",
    "AntoAndGar/task_singular_vectors": "a6c97188f7aa0bb20753de4f2939be89dd64f1c3",
    "nik-dim/tall_masks": "d10af8b21383322367fb35474bd9cd0f9ebe9ecf",
    "wang-kee/LiNeS": "43a7bdd564a16195b164abc2c64ec1856c59c211",
    "duguodong7/pcb-merging": "5897888b5d24adfcd33e124793d113746e00f3ff",
    "nathanielyvo/WUDI-Merging": "dc3cd1204a68d1930a32da11c5cddb0cbd7410bb",
}
MIRROR = Path(os.environ.get("PARITY_MIRROR", "/work/.mirror"))

CASES: list[dict] = []


# --------------------------------------------------------------------------- helpers
def git_show(repo: str, path: str) -> str:
    gitdir = MIRROR / repo.replace("/", "+") / "repo"
    return subprocess.run(
        ["git", f"--git-dir={gitdir}", "show", f"{COMMITS[repo]}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def load_from_git(
    repo: str, path: str, names: list[str] | None = None, extra: dict | None = None, whole: bool = False
) -> types.SimpleNamespace:
    """Execute reference source from a pinned commit.

    whole=True: exec the whole file (only for files whose imports are torch/numpy/stdlib).
    Otherwise: take only the top-level `def`/`class` nodes named in `names` (verbatim source),
    and exec them in a namespace holding the stdlib/torch imports they use (`extra`). This avoids
    the files' module-level imports (datasets, open_clip, wandb, argument parsing) which are not
    needed by the merge rule itself.
    """
    src = git_show(repo, path)
    ns: dict = {"torch": torch, "copy": copy, "OrderedDict": OrderedDict, "__name__": f"ref_{path}"}
    ns.update(extra or {})
    if whole:
        exec(compile(src, f"{repo}@{COMMITS[repo][:8]}:{path}", "exec"), ns)
    else:
        tree = ast.parse(src)
        nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
        found = {n.name for n in nodes}
        missing = set(names) - found
        if missing:
            raise RuntimeError(f"{repo}:{path}: missing {missing}")
        mod = ast.Module(body=nodes, type_ignores=[])
        exec(compile(mod, f"{repo}@{COMMITS[repo][:8]}:{path}", "exec"), ns)
    return types.SimpleNamespace(**ns)


def ref(repo: str, path: str, fn: str) -> str:
    return f"{repo}@{COMMITS[repo][:8]} {path}::{fn}"


def save_sd(sd: dict, name: str) -> str:
    out = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    save_file(out, str(DATA / name))
    return name


def add_case(**kw):
    for k in ("name", "method", "reference", "params", "inputs", "outputs", "dtype", "notes"):
        assert k in kw, k
    CASES.append(kw)
    tmp = HERE / "cases.json.tmp"  # atomic: readers never see a half-written file
    tmp.write_text(json.dumps(CASES, indent=1) + "\n")
    tmp.replace(HERE / "cases.json")
    print(f"[ok] {kw['name']}: {kw['outputs']}", flush=True)


# --------------------------------------------------------------------------- inputs
def make_inputs():
    layout = json.loads((HERE / "layout.json").read_text())
    g = torch.Generator().manual_seed(SEED)
    dt = torch.float64
    theta0, taus = {}, [dict() for _ in range(T)]
    for k, (shape, _) in layout.items():
        theta0[k] = torch.randn(shape, generator=g, dtype=dt) * 0.05
        for t in range(T):
            tau = torch.randn(shape, generator=g, dtype=dt) * 2e-3
            if len(shape) == 2:
                m, n = shape
                r = min(4, m, n)
                u = torch.randn(m, r, generator=g, dtype=dt) / m**0.5
                v = torch.randn(n, r, generator=g, dtype=dt) / n**0.5
                s = 0.04 * 0.5 ** torch.arange(r, dtype=dt)
                tau = tau + (u * s) @ v.T
            taus[t][k] = tau
    # exact zeros: a few entries zero in one task, one entry zero in all tasks
    kb = "model.visual.ln_pre.bias"
    taus[0][kb][:3] = 0.0
    taus[1][kb][5] = 0.0
    for t in range(T):
        taus[t][kb][7] = 0.0
    kw = "model.visual.transformer.resblocks.0.mlp.c_fc.weight"
    taus[2][kw][1, 2] = 0.0
    # exact tie: |tau_0| == |tau_1| with opposite signs and tau_2 == 0 (sum exactly 0), using
    # binary-exact values so that theta_t - theta_0 reproduces them exactly in f64 and f32.
    ko = "model.visual.transformer.resblocks.0.attn.out_proj.weight"
    theta0[ko][0, 0] = 0.0625
    taus[0][ko][0, 0] = 2.0**-9
    taus[1][ko][0, 0] = -(2.0**-9)
    taus[2][ko][0, 0] = 0.0
    # same-sign exact tie between tasks 1 and 2 (largest |tau| there)
    theta0[ko][0, 1] = -0.03125
    taus[0][ko][0, 1] = 2.0**-10
    taus[1][ko][0, 1] = 2.0**-8
    taus[2][ko][0, 1] = 2.0**-8
    thetas = [{k: theta0[k] + taus[t][k] for k in theta0} for t in range(T)]
    files64 = [save_sd(theta0, "input_f64_theta0.safetensors")] + [
        save_sd(thetas[t], f"input_f64_task_{t}.safetensors") for t in range(T)
    ]
    th0_32 = {k: v.float() for k, v in theta0.items()}
    ths_32 = [{k: v.float() for k, v in th.items()} for th in thetas]
    files32 = [save_sd(th0_32, "input_f32_theta0.safetensors")] + [
        save_sd(ths_32[t], f"input_f32_task_{t}.safetensors") for t in range(T)
    ]
    return files64, files32


def load_set(files):
    sds = [load_file(str(DATA / f)) for f in files]
    return sds[0], sds[1:]


def task_vectors(th0, ths):
    return [{k: th[k] - th0[k] for k in th0} for th in ths]


def plus(th0, vec, keys_missing_keep=True):
    """theta0 + vec (the apply_to(..., scaling_coef=1.0) arithmetic of the official repos:
    pretrained[key] + scaling_coef * vector[key]; keys absent from vec stay at theta0)."""
    return {k: (th0[k] + 1.0 * vec[k]) if k in vec else th0[k].clone() for k in th0}


# --------------------------------------------------------------------------- official repos
def case_breadcrumbs_official(th0, ths, inputs, dtype, tag):
    import abc
    import typing

    repo, path = "rezazzr/breadcrumbs", "src/task_vectors.py"
    bc = load_from_git(
        repo,
        path,
        ["TaskVectorABC", "TaskVectorMiddleKeep"],
        extra={"Optional": typing.Optional, "Dict": dict, "List": list, "ABC": abc.ABC, "safe_load_state_dict": None},
    )
    for alpha, beta, gamma in [(1.0, 0.8, 0.05), (0.4, 0.15, 0.05)]:
        tvs = [
            bc.TaskVectorMiddleKeep(vector=tv, top_k_keep=beta, top_k_remove=gamma, remove_first=True)
            for tv in task_vectors(th0, ths)
        ]
        tv_sum = sum(tvs)  # merging_trend_eval.py: task_vector_sum = sum(task_vectors)
        out = plus(th0, {k: alpha * v for k, v in tv_sum.vector.items()})
        name = f"breadcrumbs_official_a{alpha}_b{beta}_g{gamma}{tag}"
        add_case(
            name=name,
            method="breadcrumbs",
            reference=ref(repo, path, "TaskVectorMiddleKeep") + " + merging_trend_eval.py sum/apply_to",
            params={
                "scaling_coef (alpha)": alpha,
                "top_k_keep (beta)": beta,
                "top_k_remove (gamma)": gamma,
                "remove_first": True,
            },
            inputs=inputs,
            outputs=[save_sd(out, name + ".safetensors")],
            dtype=dtype,
            notes="Per row of the last dim: zero the floor(n*gamma) largest |tau|, then keep the "
            "floor(n*beta) largest of the rest; theta0 + alpha * sum_t masked tau_t (apply_to "
            "arithmetic done in generate.py since apply_to torch.loads a pickled model). "
            "Rows with n*beta < 1 keep nothing; topk tie order arbitrary (no exact ties "
            "inside rows except the seeded zeros).",
        )


def case_tsvc(th0, ths, inputs, dtype, tag):
    repo, path = "AntoAndGar/task_singular_vectors", "src/utils/TSVC_utils.py"
    m = load_from_git(repo, path, whole=True)
    tvs = {f"task_{t}": types.SimpleNamespace(vector=tv) for t, tv in enumerate(task_vectors(th0, ths))}
    for red, lab in [(1.0 / T, "1overT"), (0.1, "0.1")]:
        svd_dict = m.compress_tv(tvs, red)
        outs = []
        name = f"tsv_c_{lab}{tag}"
        for t in range(T):
            d = svd_dict[f"task_{t}"]
            # src/eval/eval.py svd_dict branch: u @ diag_embed(s) @ v, else dim1; apply_to scaling 1.0
            vec = {k: (d[k]["u"] @ torch.diag_embed(d[k]["s"]) @ d[k]["v"]) if "u" in d[k] else d[k]["dim1"] for k in d}
            outs.append(save_sd(plus(th0, vec), f"{name}_task_{t}.safetensors"))
        add_case(
            name=name,
            method="tsv_c",
            reference=ref(repo, path, "compress_tv") + " + src/eval/eval.py (svd_dict branch)",
            params={"sv_reduction": red},
            inputs=inputs,
            outputs=outs,
            dtype=dtype,
            notes="Per task: every 2-D key keeps its top int(len(s)*sv_reduction) singular triplets "
            "(pos. embedding and proj included), other keys (incl. 4-D conv1) keep full tau_t; "
            "output t = theta0 + U_k diag(s_k) V_k^T. One file per task, input order.",
        )


def case_tall_masks(th0, ths, inputs, dtype, tag):
    repo = "nik-dim/tall_masks"
    ut = load_from_git(repo, "src/utils/utils.py", whole=True)
    vp = load_from_git(repo, "src/utils/variables_and_paths.py", whole=True)
    wandb = types.SimpleNamespace(log=lambda *a, **k: None)
    tm = load_from_git(
        repo,
        "src/utils/tallmask_utils.py",
        ["log_wandb_mask_sparsity", "generate_task_masks", "construct_tall_mask"],
        extra={
            "wandb": wandb,
            "ALL_DATASETS": vp.ALL_DATASETS,
            "List": list,
            "Optional": __import__("typing").Optional,
            "state_dict_to_vector": ut.state_dict_to_vector,
            "vector_to_state_dict": ut.vector_to_state_dict,
        },
    )
    # src/eval/aggregation.py::create_task_vector, method tall_mask, use_ties false, k 100
    remove_keys = []
    ptm_check = th0
    flat_ft = torch.vstack([ut.state_dict_to_vector(c, remove_keys) for c in ths])
    flat_ptm = ut.state_dict_to_vector(ptm_check, remove_keys)
    tv_flat_checks = flat_ft - flat_ptm
    tv_flat_checks, _ = ut.topk_values_mask(tv_flat_checks, K=100, return_mask=False)
    merged_tv = tv_flat_checks.sum(dim=0)
    config = types.SimpleNamespace(DATASETS=[f"task_{t}" for t in range(T)])
    eval_masks_all = tm.construct_tall_mask(
        tv_flat_checks, flat_ft, flat_ptm, merged_tv, ptm_check, remove_keys, config
    )
    merged_sd = ut.vector_to_state_dict(merged_tv, ptm_check, remove_keys=remove_keys)
    for lam in [0.4]:
        masks = eval_masks_all[lam]
        name = f"tall_masks_lambda{lam}{tag}"
        outs = []
        for t in range(T):
            mask = masks[f"task_{t}"]
            # src/eval/eval.py: sparse vector = vector[k] * mask[k].bool(); apply_to scaling 1.0
            vec = {k: merged_sd[k] * mask[k].bool().cpu() for k in mask.keys()}
            outs.append(save_sd(plus(th0, vec), f"{name}_task_{t}.safetensors"))
        add_case(
            name=name,
            method="tall_masks",
            reference=f"{repo}@{COMMITS[repo][:8]} src/utils/tallmask_utils.py::construct_tall_mask "
            "(generate_task_masks) + aggregation.py::create_task_vector (tall_mask) + eval.py",
            params={"tall_mask_lambda": lam, "use_ties": False, "k": 100},
            inputs=inputs,
            outputs=outs,
            dtype=dtype,
            notes="tau_MTL = sum_t tau_t over the flattened model (sorted keys); "
            "m_t = |theta0 - theta_t| > lambda * |theta0 + tau_MTL - theta_t| (strict); "
            "output t = theta0 + m_t * tau_MTL. The same lambda for every task (the official "
            "code picks it per task on validation from {0.2..0.6}).",
        )


def case_lines(th0, ths, inputs, dtype, tag, beta=0.5, num_blocks=2):
    repo = "wang-kee/LiNeS"
    ut = load_from_git(repo, "src/utils/utils.py", whole=True)
    tu = load_from_git(
        repo,
        "src/utils/ties_utils.py",
        ["resolve_zero_signs", "resolve_sign", "disjoint_merge", "ties_merging"],
        extra={"topk_values_mask": ut.topk_values_mask},
    )
    ev = load_from_git(repo, "src/eval/eval.py", ["LiNeS_scaling"])
    for base in ["sum", "ties"]:
        # src/eval/aggregation.py::create_task_vector
        remove_keys = []
        ptm_check = th0
        flat_ft = torch.vstack([ut.state_dict_to_vector(c, remove_keys) for c in ths])
        flat_ptm = ut.state_dict_to_vector(ptm_check, remove_keys)
        tv_flat_checks = flat_ft - flat_ptm
        if base == "ties":
            merged_tv = tu.ties_merging(tv_flat_checks, reset_thresh=20, merge_func="dis-mean")
        else:
            tv_flat_checks, _ = ut.topk_values_mask(tv_flat_checks, K=100, return_mask=False)
            merged_tv = tv_flat_checks.sum(dim=0)
        norm_mtv = merged_tv.abs().sum().item()
        norm_summed_tvs = tv_flat_checks.sum(dim=0).abs().sum().item()
        merged_sd = ut.vector_to_state_dict(merged_tv, ptm_check, remove_keys=remove_keys)
        tv = types.SimpleNamespace(vector=merged_sd)
        # src/eval/eval.py::evaluate (multi-task branch)
        alpha = (norm_summed_tvs / norm_mtv) * 1 / T
        scaled = ev.LiNeS_scaling(tv, alpha=alpha, beta=beta, num_blocks=num_blocks)
        out = plus(th0, scaled.vector)
        name = f"lines_{'ta' if base == 'sum' else 'ties'}_beta{beta}{tag}"
        add_case(
            name=name,
            method="lines",
            reference=ref(repo, "src/eval/eval.py", "LiNeS_scaling")
            + " + aggregation.py::create_task_vector ("
            + base
            + ") + utils/ties_utils.py::ties_merging",
            params={
                "method.name": base,
                **({"k": 20, "agg": "mean", "merge_func": "dis-mean"} if base == "ties" else {"k": 100}),
                "beta": beta,
                "num_blocks": num_blocks,
                "num_tasks": T,
                "alpha": alpha,
            },
            inputs=inputs,
            outputs=[save_sd(out, name + ".safetensors")],
            dtype=dtype,
            notes="alpha = (||sum tau||_1 / ||tau_m||_1) / T (computed with .item(), recorded); key with "
            "'.l.' gets alpha + beta*l/(L-1), others alpha; theta0 + scaled tau_m. num_blocks set to "
            "the layout depth 2 (the official script hard-codes 12).",
        )


def case_pcb(th0, ths, inputs, dtype, tag):
    repo = "duguodong7/pcb-merging"
    tpa = load_from_git(repo, "vision_source_code/utils/tpa_utils.py", ["state_dict_to_vector", "vector_to_state_dict"])
    flat_ft = torch.vstack([tpa.state_dict_to_vector(c, []) for c in ths])
    flat_ptm = tpa.state_dict_to_vector(th0, [])
    tv_flat_checks = flat_ft - flat_ptm
    # reference variant
    pm = load_from_git(repo, "pcb-merging.py", ["normalize", "clamp", "act", "PCB_merge"])
    for r in [0.1, 0.05]:
        merged_tv, _, _ = pm.PCB_merge(tv_flat_checks.clone(), pcb_ratio=r)
        out = tpa.vector_to_state_dict(flat_ptm + merged_tv, th0, remove_keys=[])
        name = f"pcb_reference_r{r}{tag}"
        add_case(
            name=name,
            method="pcb",
            reference=ref(repo, "pcb-merging.py", "PCB_merge"),
            params={"pcb_ratio": r},
            inputs=inputs,
            outputs=[save_sd(out, name + ".safetensors")],
            dtype=dtype,
            notes="Flattened over sorted keys (vision_source_code/utils/tpa_utils.py state_dict_to_vector); "
            "clamp ratios 1e-4; inter = tanh(tau_i * sum_s tau_s); theta0 + merged_tv (no lambda).",
        )
    # pairwise variant (pcb_ES.py::PCB) with fixed lams = nevergrad init [1.0]*n, merged by compute_acc
    es = load_from_git(repo, "vision_source_code/pcb_ES.py", ["normalize", "clamp", "act", "PCB", "compute_acc"])
    captured = {}
    es.vector_to_state_dict = lambda v, sd, remove_keys=[]: captured.setdefault(
        "sd", tpa.vector_to_state_dict(v, sd, remove_keys)
    )
    es.loadCheckpoint_intoModel = lambda ck, model: model
    es.eval_single_dataset = lambda model, ds, args: 0.0
    # compute_acc resolves globals through its function globals (the exec namespace):
    g = es.compute_acc.__globals__
    g.update(
        vector_to_state_dict=es.vector_to_state_dict,
        loadCheckpoint_intoModel=es.loadCheckpoint_intoModel,
        eval_single_dataset=es.eval_single_dataset,
    )
    r = 0.05
    lams = [1.0] * T
    clamped_all_checks, scale = es.PCB(tv_flat_checks.clone(), pcb_ratio=r)
    es.compute_acc(lams, clamped_all_checks, scale, flat_ptm, None, ["dummy"], types.SimpleNamespace(), "test", th0, [])
    name = f"pcb_pairwise_r{r}_lam1.0{tag}"
    add_case(
        name=name,
        method="pcb",
        reference=ref(repo, "vision_source_code/pcb_ES.py", "PCB") + " + compute_acc (merge lines; eval stubbed)",
        params={"pcb_ratio": r, "lams": lams},
        inputs=inputs,
        outputs=[save_sd(captured["sd"], name + ".safetensors")],
        dtype=dtype,
        notes="c = 0.01, N = sign*minmax(A), inter_i = sum_j tanh(N_i*N_j); lams fixed at the nevergrad "
        "init [1.0]*n (no search), passed as torch.tensor(lams) (float32, exact for 1.0); "
        "theta0 + sum(lam*C*scale)/max(sum scale,1e-12). compute_acc's eval/model loading stubbed, "
        "its vector_to_state_dict is the repo's tpa_utils one (output captured there).",
    )


def case_wudi_official(th0, ths, inputs, dtype, tag, iter_num=30):
    repo, path = "nathanielyvo/WUDI-Merging", "vit/wudi_main.py"
    tvmod = load_from_git(repo, "vit/task_vectors.py", whole=True)
    wm = load_from_git(
        repo,
        path,
        ["get_redundant_task_vector", "decompose_task_vectors"],
        extra={"tqdm": lambda x, *a, **k: x, "deepcopy": copy.deepcopy, "TaskVector": tvmod.TaskVector},
    )
    tvs = [tvmod.TaskVector(vector=tv) for tv in task_vectors(th0, ths)]
    orig_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # the function hard-codes .cuda(); run it on CPU
    try:
        merged = wm.decompose_task_vectors(tvs, iter_num=iter_num, ratio=1)
    finally:
        torch.Tensor.cuda = orig_cuda
    out = plus(th0, merged.vector)  # task_vector.apply_to(pretrained, scaling_coef=1): missing keys -> theta0
    name = f"wudi_official_iter{iter_num}{tag}"
    add_case(
        name=name,
        method="wudi",
        reference=ref(repo, path, "decompose_task_vectors"),
        params={"iter_num": iter_num, "ratio": 1},
        inputs=inputs,
        outputs=[save_sd(out, name + ".safetensors")],
        dtype=dtype,
        notes="Only keys containing attn.in_proj_weight / attn.out_proj.weight / mlp.c_fc.weight / "
        "mlp.c_proj.weight are merged (Adam lr 1e-5 from X0 = sum tau, loss "
        "sum ||(X - tau_t) tau_t^T||^2/||tau_t||^2); every other key stays at theta0. "
        "Run on CPU: torch.Tensor.cuda patched to identity during the call.",
    )


# --------------------------------------------------------------------------- FusionBench / mergekit
def sd_to_module(sd: dict) -> torch.nn.Module:
    """An nn.Module whose named_parameters / state_dict keys are exactly the layout keys."""
    root = torch.nn.Module()
    for k, v in sd.items():
        *path, leaf = k.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p) or getattr(mod, p) is None:
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(
            leaf, torch.nn.Parameter(v.clone(), requires_grad=True)
        )  # as in real models (FB DARE uses trainable params)
    return root


def module_sd(m) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


class _Fabric:
    """Stand-in for lightning Fabric: FB's fabric-mixin algorithms only read .device/_loggers."""

    device = torch.device("cpu")
    _loggers: ClassVar[list] = []


def make_pool(th0, ths):
    from fusion_bench import BaseModelPool

    class CopyingPool(BaseModelPool):
        # FB's BaseModelPool.load_model returns the stored nn.Module itself; several algorithms then
        # write into the loaded theta0 (aliasing). Loading from disk would give a fresh copy: do that.
        def load_model(self, name, *a, **k):
            return copy.deepcopy(super().load_model(name, *a, **k))

    models = {"_pretrained_": sd_to_module(th0)}
    for t, th in enumerate(ths):
        models[f"task_{t}"] = sd_to_module(th)
    return CopyingPool(models)


def fb_ref(mod_path: str, fn: str) -> str:
    from importlib.metadata import version

    return f"fusion-bench {version('fusion-bench')} (PyPI; = tag v0.2.33, 2d147c0c) {mod_path}::{fn}"


def case_magmax(th0, ths, inputs, dtype, tag):
    from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

    for s in [0.5, 1.0]:
        alg = MagMaxAlgorithm(scaling_factor=s, inplace=False)
        out = module_sd(alg.run(make_pool(th0, ths)))
        name = f"magmax_s{s}{tag}"
        add_case(
            name=name,
            method="magmax",
            reference=fb_ref("fusion_bench/method/magmax/magmax.py", "MagMaxAlgorithm.run"),
            params={"scaling_factor": s, "inplace": False},
            inputs=inputs,
            outputs=[save_sd(out, name + ".safetensors")],
            dtype=dtype,
            notes="Pool order task_0..task_2 (input order). Running max |tau| with >=, so a later task "
            "wins an exact tie: the seeded opposite-sign tie at out_proj.weight[0,0] of block 0 "
            "resolves to task_1 (negative); the same-sign tie at [0,1] is harmless.",
        )


def case_emr(th0, ths, inputs, dtype, tag):
    from fusion_bench.method.emr_merging.emr_merging import EMRMerging

    pool = make_pool(th0, ths)
    emr_model = EMRMerging().run(pool)
    name = f"emr{tag}"
    outs, rescalers = [], []
    for t, task in enumerate(pool.model_names):
        m = copy.deepcopy(emr_model)  # set_task mutates the backbone in place: one fresh copy per task
        m.set_task(task)
        rescalers.append(float(m.modulators[task].rescaler))
        outs.append(save_sd(module_sd(m.backbone), f"{name}_task_{t}.safetensors"))
    add_case(
        name=name,
        method="emr",
        reference=fb_ref(
            "fusion_bench/method/emr_merging/emr_merging.py",
            "EMRMerging.run (utils.emr_merge) + EMRModulatedModel.set_task",
        ),
        params={},
        inputs=inputs,
        outputs=outs,
        dtype=dtype,
        notes="Per task: theta0 + tau_uni * mask_t * rescaler_t (backbone after set_task on a deepcopy). "
        "flag = +1 where sum tau > 0 else -1 (0 -> -1); rescalers accumulate in float32 "
        f"(torch.zeros(T)) key by key in state-dict order: rescalers = {rescalers}.",
    )


def case_svc(th0, ths, inputs, dtype, tag):
    from fusion_bench.method import TaskSingularVectorMerging
    from fusion_bench.method.singular_value_calibration.generic import SingularValueCalibrationWithBaseMethod
    from fusion_bench.method.singular_value_calibration.task_arithmetic import SingularValueCalibrationArithmeticTask

    impl = os.environ.get("FUSION_BENCH_SVC_IMPL", "default (vectorised)")
    alg = SingularValueCalibrationArithmeticTask(scaling_factor=0.3, alpha=0.1, accelerator="cpu")
    out = module_sd(alg.run(make_pool(th0, ths)))
    name = f"svc_ta_l0.3_a0.1{tag}"
    add_case(
        name=name,
        method="svc",
        reference=fb_ref(
            "fusion_bench/method/singular_value_calibration/task_arithmetic.py",
            "SingularValueCalibrationArithmeticTask.run",
        ),
        params={"scaling_factor": 0.3, "alpha": 0.1, "accelerator": "cpu"},
        inputs=inputs,
        outputs=[save_sd(out, name + ".safetensors")],
        dtype=dtype,
        notes=f"Base merge: FB TaskArithmetic (theta0 + 0.3 sum tau, inplace=False); SVC on every 2-D parameter, "
        f"others keep the TA merge. FUSION_BENCH_SVC_IMPL={impl}. Pool load_model deep-copies.",
    )
    base = TaskSingularVectorMerging(alpha=1, exclude_keys=None, return_single_task_models=False)
    base.fabric = _Fabric()
    alg = SingularValueCalibrationWithBaseMethod(base_method=base, alpha=1.0, accelerator="cpu")
    alg.fabric = _Fabric()
    pool = make_pool(th0, ths)
    out = module_sd(alg.run(pool))
    base_out = module_sd(pool.load_model("_merged_"))
    ko = "model.visual.transformer.resblocks.0.attn.out_proj.weight"
    assert not torch.equal(out[ko], base_out[ko]), "SVC returned the base merge unchanged (aliasing?)"
    name = f"svc_tsvm_a1.0{tag}"
    add_case(
        name=name,
        method="svc",
        reference=fb_ref(
            "fusion_bench/method/singular_value_calibration/generic.py", "SingularValueCalibrationWithBaseMethod.run"
        )
        + " with base fusion_bench.method.TaskSingularVectorMerging",
        params={
            "alpha": 1.0,
            "accelerator": "cpu",
            "base_method": {
                "_target_": "fusion_bench.method.TaskSingularVectorMerging",
                "alpha": 1,
                "exclude_keys": None,
                "return_single_task_models": False,
            },
        },
        inputs=inputs,
        outputs=[save_sd(out, name + ".safetensors"), save_sd(base_out, name + "_base_tsvm.safetensors")],
        dtype=dtype,
        notes="outputs[0] = SVC-calibrated model, outputs[1] = the TSV-M base merge it calibrated (for "
        "checking the base separately). Config task_singular_vector.yaml values. Workarounds: pool "
        "load_model deep-copies (else _merged_ aliases _pretrained_ and SVC is a no-op); "
        "alg.fabric / base.fabric = stub with .device=cpu and _loggers=[]. "
        f"FUSION_BENCH_SVC_IMPL={impl}.",
    )


def case_wudi_fb(th0, ths, inputs, dtype, tag, iter_num=30):
    from fusion_bench.method import WUDIMerging

    alg = WUDIMerging(iter_num=iter_num, exclude_keys=None)
    alg.fabric = _Fabric()
    with torch.enable_grad():
        out = module_sd(alg.run(make_pool(th0, ths)))
    name = f"wudi_fb_iter{iter_num}{tag}"
    add_case(
        name=name,
        method="wudi",
        reference=fb_ref("fusion_bench/method/wudi/wudi.py", "WUDIMerging.run (wudi_merging)"),
        params={"iter_num": iter_num, "exclude_keys": None},
        inputs=inputs,
        outputs=[save_sd(out, name + ".safetensors")],
        dtype=dtype,
        notes="Every 2-D key (pos. embedding and proj included): Adam (lr 1e-5) from X0 = sum tau; "
        "other keys (1-D, 4-D conv1) get mean tau; theta0 + X. CPU, fabric stub (.device=cpu).",
    )


def case_dare(th0, ths, inputs, dtype, tag):
    from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic

    torch.manual_seed(0)
    alg = DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.0, only_on_linear_weights=False, rescale=True)
    out = module_sd(alg.run(make_pool(th0, ths)))
    name = f"dare_ta_p0.0_l0.3{tag}"
    add_case(
        name=name,
        method="dare",
        reference=fb_ref("fusion_bench/method/dare/task_arithmetic.py", "DareTaskArithmetic.run"),
        params={"scaling_factor": 0.3, "sparsity_ratio": 0.0, "only_on_linear_weights": False, "rescale": True},
        inputs=inputs,
        outputs=[save_sd(out, name + ".safetensors")],
        dtype=dtype,
        notes="p = 0: keep = rand_like > 0 keeps everything (rand in [0,1) can be exactly 0 only with "
        "probability ~2^-53/2^-24), rescale 1/(1-0) = 1, so this equals task arithmetic "
        "theta0 + 0.3 sum tau. DARE with p > 0 is RNG-dependent: test by properties.",
    )


def case_breadcrumbs_mergekit(th0, ths, inputs, dtype, tag):
    from importlib.metadata import version

    from mergekit.merge_methods.api import merge_state_dicts

    models = {"base": th0, **{f"t{t}": th for t, th in enumerate(ths)}}
    params = {"weight": 1.0, "density": 0.8, "gamma": 0.05, "lambda": 1.0}
    for method in ["breadcrumbs", "breadcrumbs_ties"]:
        with torch.no_grad():
            out = merge_state_dicts(models, method, parameters=params, base="base")
        out = {k: out[k] for k in th0}
        name = f"{method}_mergekit_d0.8_g0.05{tag}"
        add_case(
            name=name,
            method="breadcrumbs",
            reference=f"mergekit {version('mergekit')} mergekit.merge_methods.api.merge_state_dicts(method='{method}')",
            params={
                "method": method,
                "parameters": params,
                "base": "base",
                "models": "{'base': theta0, 't0': task_0, 't1': task_1, 't2': task_2}",
            },
            inputs=inputs,
            outputs=[save_sd(out, name + ".safetensors")],
            dtype=dtype,
            notes="Per tensor and task (1-D included): keep sorted |delta| positions [n_bot, n_bot+target) "
            "(target = floor(density n), n_top = floor(gamma n), n_bot = n - target - n_top), sort in "
            "float32 on CPU; ties variant: majority sign (0 -> +1) disjoint SUM (normalize false). "
            "theta0 + lambda * merged. Output dtype as returned by mergekit (see dtype).",
        )


# --------------------------------------------------------------------------- main
ORDER = [
    ("magmax", [case_magmax]),
    ("emr", [case_emr]),
    ("svc", [case_svc]),
    ("wudi", [case_wudi_fb, case_wudi_official]),
    ("breadcrumbs", [case_breadcrumbs_mergekit, case_breadcrumbs_official]),
    ("tsv_c", [case_tsvc]),
    ("tall_masks", [case_tall_masks]),
    ("lines", [case_lines]),
    ("pcb", [case_pcb]),
    ("dare", [case_dare]),
]
F32_CASES = {"magmax": [case_magmax], "emr": [case_emr]}  # the float32-rounded input set


def main():
    global MIRROR
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirror", default=str(MIRROR), help="dir holding <owner>+<name>/repo bare git mirrors")
    ap.add_argument("--only", default="", help="comma-separated mergeflow method names")
    a = ap.parse_args()
    MIRROR = Path(a.mirror)
    only = set(filter(None, a.only.split(",")))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    DATA.mkdir(parents=True, exist_ok=True)
    if not only:
        for p in DATA.glob("*.safetensors"):
            p.unlink()
    elif (HERE / "cases.json").exists():  # keep the other methods' cases
        CASES.extend(c for c in json.loads((HERE / "cases.json").read_text()) if c["method"] not in only)
    f64, f32 = make_inputs()
    th0, ths = load_set(f64)
    th0_32, ths_32 = load_set(f32)
    failed = []
    for method, fns in ORDER:
        if only and method not in only:
            continue
        for fn, sets in [(f, [(th0, ths, f64, "float64", "")]) for f in fns] + [
            (f, [(th0_32, ths_32, f32, "float32", "_f32")]) for f in F32_CASES.get(method, [])
        ]:
            for s in sets:
                try:
                    fn(*s)
                except Exception as e:  # record and go on: partial data beats none
                    import traceback

                    traceback.print_exc()
                    failed.append(f"{fn.__name__}{s[4]}: {type(e).__name__}: {e}")
    total = sum(p.stat().st_size for p in DATA.glob("*.safetensors"))
    print(f"{len(CASES)} cases, data {total / 1e6:.2f} MB")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
