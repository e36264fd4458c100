"""Low-rank plugin: linear weights factored W ≈ U V, and Nyström attention.

    minitx optimize model.npz --plugin lowrank:rank=32 -o model.r32.npz
    minitx optimize model.npz --plugin lowrank:energy=0.9,qkv=none,method=whiten -o model.lr.npz
    minitx optimize bert.npz --plugin lowrank:attention=nystrom,landmarks=32,qkv=none,out=none,mlp=none

Per layer type — ``qkv``, ``out`` (attention projections) and ``mlp`` — the truncation is a rank
(an integer), an energy fraction (a number in (0, 1]: the smallest rank keeping that share of
Σσ², measured on the matrix being truncated) or ``none``; the type's default comes from ``rank=``
or ``energy=``. Methods:

* ``svd``    — truncated SVD of W (optimal in Frobenius norm);
* ``rsvd``   — randomized SVD (Halko et al., 2011): a Gaussian range finder with power
  iterations, seeded, used automatically by ``svd`` for matrices with min side ≥ ``rsvd_from``;
* ``whiten`` — activation-aware: minimises ‖X W − X U V‖ over calibration inputs X by taking the
  SVD of Lᵀ W with L Lᵀ = XᵀX/N + εI and mapping back, U = L⁻ᵀ U_r Σ_r (cf. SVD-LLM). X are the
  layer inputs on the calibration input of ``minitx optimize`` (``--calib file:PATH``, texts or
  ids); without ``--calib`` they come from seeded random tokens, and the log and a warning say so.

The factors replace the ``linear`` by ``lowrank_linear`` (``form=op``) or by two ``linear`` s
(``form=two``). ``attention=nystrom`` turns non-causal attention into ``nystrom_attention`` with
``landmarks`` landmarks (where that pays: minitx/ops/lowrank.py's docstring — on
all-MiniLM-L6-v2 only ``landmarks=128`` passes, at ~14× dense attention's FLOPs at 256 tokens;
32 or 64 landmarks undercut dense only from ~200 / ~400 tokens). Everything here is approximate; ``minitx optimize`` checks the declared
tolerance ``TOLERANCE`` (minitx.plugin.Tolerance): mean per-row cosine >= 0.95 and, for decoders,
mean next-token KL <= 0.05 nats and perplexity <= +5% on the validation text (top-1 agreement
is reported). On the bundled Austen decoder ``rank=64,method=whiten`` passes (KL 0.001, perplexity under +1%) and
``rank=2`` is refused (KL 4.4). The options ``min_cosine=``, ``max_kl=``, ``min_top1=``,
``max_ppl_increase=`` (relative), ``min_row_cosine=`` (worst row, off by default) and ``max_rel=``
override one bound each (``inf``, or 0 for a minimum, turns one off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from minitx.errors import MinitxError
from minitx.ir import Graph, Node
from minitx.plugin import CalibrationData, Option, Plugin, Tolerance, positive_int
from minitx.rewrite import Context, Replacement, Rule

from .sparsity import block_linears, calibration_run, unit_interval

TYPES = ("qkv", "out", "mlp")
TOLERANCE = Tolerance(min_cosine=0.95, max_kl=0.05, max_ppl_increase=0.05)


def truncation(s: str) -> Any:
    """``none`` | an integer rank ≥ 1 | an energy fraction in (0, 1]."""
    s = s.strip().lower()
    if s == "none":
        return None
    if s.isdigit():
        r = int(s)
        if r < 1:
            raise ValueError("a rank must be >= 1")
        return r
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise ValueError("expected none, an integer rank, or an energy fraction in (0, 1]")
    return v


# ================================================================== pure factorisations
def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest r with Σ_{k<r} σ_k² ≥ energy · Σ σ_k²."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    return int(min(np.searchsorted(e, energy * e[-1] * (1 - 1e-12)) + 1, s.size)) if e[-1] > 0 else 1


def randomized_svd(a: np.ndarray, rank: int, *, oversample: int = 8, power_iters: int = 2,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``rank`` (U, σ, Vᵀ) of ``a`` from a seeded Gaussian sketch: Q spans A Ω, refined by
    ``power_iters`` rounds of (A Aᵀ) with re-orthonormalisation; then the SVD of the small Qᵀ A."""
    m, n = a.shape
    if not 1 <= rank <= min(m, n):
        raise MinitxError(f"rank {rank} must be between 1 and min{a.shape} = {min(m, n)}")
    a = a.astype(np.float64)
    k = min(rank + oversample, min(m, n))
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(a @ rng.standard_normal((n, k)))
    for _ in range(power_iters):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank]


def svd_factors(w: np.ndarray, trunc: int | float, *, method: str = "svd", rsvd_from: int = 1024,
                oversample: int = 8, power_iters: int = 2, seed: int = 0, name: str = "weight"
                ) -> tuple[np.ndarray, np.ndarray]:
    """W (in, out) ≈ U V with U = U_r Σ_r (in, r), V = V_rᵀ (r, out); ``trunc`` a rank or an energy."""
    full = min(w.shape)
    if isinstance(trunc, int) and trunc > full:
        raise MinitxError(f"lowrank: rank {trunc} is larger than {name} {tuple(w.shape)} allows (at most {full})")
    if method == "rsvd" or (method == "svd" and full >= rsvd_from and isinstance(trunc, int)):
        u, s, vt = randomized_svd(w, int(trunc), oversample=oversample, power_iters=power_iters, seed=seed)
    else:
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        r = trunc if isinstance(trunc, int) else rank_for_energy(s, trunc)
        u, s, vt = u[:, :r], s[:r], vt[:r]
    return (u * s).astype(w.dtype), vt.astype(w.dtype)


def whitened_factors(w: np.ndarray, x: np.ndarray, trunc: int | float, *, eps: float = 1e-6,
                     name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Activation-aware W ≈ U V minimising ‖X (W − U V)‖_F: with XᵀX/N + εI = L Lᵀ,
    ‖X A‖ = ‖Lᵀ A‖, so truncate the SVD of Lᵀ W and map back with L⁻ᵀ."""
    full = min(w.shape)
    if isinstance(trunc, int) and trunc > full:
        raise MinitxError(f"lowrank: rank {trunc} is larger than {name} {tuple(w.shape)} allows (at most {full})")
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    cov = x.T @ x / max(len(x), 1)
    cov += eps * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
    L = np.linalg.cholesky(cov)
    u, s, vt = np.linalg.svd(L.T @ w.astype(np.float64), full_matrices=False)
    r = trunc if isinstance(trunc, int) else rank_for_energy(s, trunc)
    U = np.linalg.solve(L.T, u[:, :r] * s[:r])
    return U.astype(w.dtype), vt[:r].astype(w.dtype)


def layer_type(node_name: str) -> str | None:
    if ".attn.qkv" in node_name:
        return "qkv"
    if ".attn.out" in node_name:
        return "out"
    if ".mlp." in node_name:
        return "mlp"
    return None


# ================================================================== the plugin
class LowRankPlugin(Plugin):
    name = "lowrank"
    description = "truncated (randomized / activation-aware) SVD of linear weights; Nyström attention"
    order = 35
    positional = None
    exact = False
    options = {
        "rank": Option(None, positive_int, "default rank for every layer type"),
        "energy": Option(None, unit_interval, "default energy fraction (when no rank)"),
        "qkv": Option("default", help="qkv projection: none | RANK | ENERGY"),
        "out": Option("default", help="attention output projection: none | RANK | ENERGY"),
        "mlp": Option("default", help="MLP projections: none | RANK | ENERGY"),
        "method": Option("svd", help="factorisation", choices=("svd", "rsvd", "whiten")),
        "rsvd_from": Option(1024, positive_int, "svd: use the randomized SVD from this min side"),
        "power_iters": Option(2, int, "rsvd: power iterations"),
        "oversample": Option(8, int, "rsvd: extra sketch columns"),
        "form": Option("op", help="lowrank_linear op or two linears", choices=("op", "two")),
        "attention": Option("none", help="attention approximation", choices=("none", "nystrom")),
        "landmarks": Option(32, positive_int, "nystrom: number of landmarks"),
        "seed": Option(0, int, "rsvd: seed of the random sketch"),
        **Tolerance.options(),
    }

    def check_options(self, opts: Mapping[str, Any]) -> None:
        for t in TYPES:
            v = opts[t]
            if v != "default" and not isinstance(v, (int, float)) and v is not None:
                try:
                    truncation(str(v))
                except ValueError as e:
                    raise MinitxError(f"bad value {v!r} for {t}: {e}") from None
        if all(self.truncations(opts)[t] is None for t in TYPES) and opts["attention"] == "none":
            raise MinitxError("nothing to do: give rank=, energy=, a per-type qkv=/out=/mlp=, or attention=nystrom")

    @staticmethod
    def truncations(opts: Mapping[str, Any]) -> dict[str, int | float | None]:
        default = opts["rank"] if opts["rank"] is not None else opts["energy"]
        out = {}
        for t in TYPES:
            v = opts[t]
            out[t] = default if v == "default" else (truncation(v) if isinstance(v, str) else v)
        return out

    def tolerance(self, opts: Mapping[str, Any]) -> Tolerance:
        return TOLERANCE.override(opts)

    def rules(self, opts: Mapping[str, Any]) -> list[Rule]:
        out = [Rule("lowrank.svd", "linear", _lowrank_rule)]
        if opts["attention"] == "nystrom":
            out.append(Rule("lowrank.nystrom", "attention", _nystrom_rule))
        return out

    def uses_calibration(self, opts: Mapping[str, Any]) -> bool:
        return opts["method"] == "whiten"

    def analyze(self, graph: Graph, params: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                calib: CalibrationData | None = None) -> "LowRankPlan":
        trunc = self.truncations(opts)
        nodes = [n for n in block_linears(graph) if trunc.get(layer_type(n.name)) is not None]
        acts: dict[str, np.ndarray] = {}
        if opts["method"] == "whiten" and nodes:
            runs = calibration_run(graph, params, sorted({n.inputs[0] for n in nodes}), calib, who="lowrank")
            acts = {k: np.concatenate(v) for k, v in runs.items()}
        return LowRankPlan(trunc, frozenset(n.name for n in nodes), acts)


@dataclass(frozen=True)
class LowRankPlan:
    """What :meth:`LowRankPlugin.analyze` decided: the truncation (rank or energy) per layer type,
    the linear nodes to factor, and for ``method=whiten`` each one's calibration input activations."""

    truncations: dict[str, int | float | None]
    targets: frozenset[str]
    activations: dict[str, np.ndarray] = field(default_factory=dict)


def plugin() -> LowRankPlugin:
    """Entry point ``minitx.plugins: lowrank``."""
    return LowRankPlugin()


def _lowrank_rule(node: Node, ctx: Context) -> Replacement | None:
    o, plan = ctx.options, ctx.plan
    if node.name not in plan.targets or "rule" in node.tags:
        return None
    x, w, *rest = node.inputs
    b = rest[0] if rest else ""
    W = ctx.param(w)
    trunc = plan.truncations[layer_type(node.name)]
    if o["method"] == "whiten":
        U, V = whitened_factors(W, plan.activations[x], trunc, name=w)
    else:
        U, V = svd_factors(W, trunc, method=o["method"], rsvd_from=o["rsvd_from"], oversample=o["oversample"],
                           power_iters=o["power_iters"], seed=o["seed"], name=w)
    base = w[:-len(".weight")] if w.endswith(".weight") else w
    u, v = ctx.add_param(base + ".lowrank.u", U), ctx.add_param(base + ".lowrank.v", V)
    tags = {**node.tags, "rank": int(U.shape[1])}
    if o["form"] == "op":
        return Replacement([ctx.node("lowrank_linear", [x, u, v, b], node.outputs, name=node.name + ".lowrank",
                                     tags=tags)])
    first = ctx.node("linear", [x, u], name=node.name + ".lowrank_u", tags=tags)
    second = ctx.node("linear", [first.outputs[0], v, b], node.outputs, name=node.name + ".lowrank_v", tags=tags)
    return Replacement([first, second])


def _nystrom_rule(node: Node, ctx: Context) -> Replacement | None:
    if node.attrs.get("causal"):
        return None  # Nyström mixes all positions: decoders keep exact attention
    attrs = {k: v for k, v in node.attrs.items() if k in ("n_heads", "n_kv_heads", "scale")}
    attrs.update(causal=False, n_landmarks=ctx.options["landmarks"])
    return Replacement([Node(ctx.fresh(node.name + ".nystrom"), "nystrom_attention", list(node.inputs),
                             list(node.outputs), attrs, dict(node.tags))])
