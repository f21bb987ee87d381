"""The scaling law L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla's third approach, and the
iso-FLOP view (its second approach).

Fit: minimise the Huber loss (delta 1e-3) of log L-hat - log L over (a, b, e, alpha, beta) with A = exp(a),
B = exp(b), E = exp(e), so that log L-hat = LSE(a - alpha log N, b - beta log D, e); L-BFGS-B from the best starts
of Chinchilla's grid of initialisations. Intervals: percentile bootstrap over runs.

Compute: a run of N parameters on D tokens costs C = c(N) D, with c(N) the records' own FLOPs per token (their
`flops` / `tokens`, per size, interpolated log-log between the sizes and extrapolated along the end segments; 6N
where the records carry no FLOPs). LaBraM's objective is not 6N a token (two student passes, the frozen
tokenizer's forward, the lm head: 3.6 x 6N at 0.5M parameters, 2.1 x at 369M), so the compute-optimal
N*(C) = argmin_N L(N, C / c(N)) is found numerically; with c(N) = 6N it is Chinchilla's N* ~ C^a,
a = beta / (alpha + beta), which `a` and `b` report.

Everything here is a pure function of arrays; fit_results reads and writes the files.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

from labram_jax.errors import UserError
from labram_jax.files import write_json

DELTA = 1e-3
# Chinchilla's grid of initialisations: alpha, beta, e, a, b (log E, log A, log B).
INIT_GRID = np.array(list(itertools.product(np.arange(0, 25.1, 5), np.arange(0, 25.1, 5), np.arange(-1, 1.1, 0.5),
                                            np.arange(0, 2.1, 0.5), np.arange(0, 2.1, 0.5))))  # a, b, e, alpha, beta
STARTS = 16  # L-BFGS runs from the grid's best points (all 4,500 would cost 300x more for the same optimum)
# Near-L1 (delta << the noise), the loss has kinks where L-BFGS-B's default tolerances stop it early: from
# different starts it then halts at different points, and a bootstrap warm-started at the fit hardly moves.
TOLERANCES = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000}
EXPONENT_BOUNDS = (0.0, 10.0)  # alpha and beta
KEYS = ("E", "A", "alpha", "B", "beta", "a", "b")


@dataclasses.dataclass(frozen=True)
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in KEYS}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Training FLOPs per token as a function of N: log-log interpolation between the measured sizes, extrapolated
    along the end segments (one size: proportional to N); 6N without measurements."""

    sizes: tuple[float, ...] = ()  # N of each measured size, ascending
    per_token: tuple[float, ...] = ()  # its FLOPs per token

    def __call__(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, float)
        if not self.sizes:
            return 6 * n
        if len(self.sizes) == 1:
            return self.per_token[0] * n / self.sizes[0]
        x, xs, ys = np.log(n), np.log(self.sizes), np.log(self.per_token)
        slope_lo, slope_hi = (ys[1] - ys[0]) / (xs[1] - xs[0]), (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        y = np.where(x < xs[0], ys[0] + (x - xs[0]) * slope_lo,
                     np.where(x > xs[-1], ys[-1] + (x - xs[-1]) * slope_hi, np.interp(x, xs, ys)))
        return np.exp(y)

    @classmethod
    def of_records(cls, n: np.ndarray, tokens: np.ndarray, flops: np.ndarray | None) -> Cost:
        """Each size's FLOPs per token (the geometric mean over its runs); 6N where flops is None."""
        if flops is None:
            return cls()
        sizes = np.unique(n)
        per_token = [float(np.exp(np.mean(np.log(flops[n == s] / tokens[n == s])))) for s in sizes]
        return cls(tuple(map(float, sizes)), tuple(per_token))

    def as_dict(self) -> dict:
        return {"source": "records" if self.sizes else "6N", "sizes": list(self.sizes),
                "per_token": list(self.per_token),
                "per_token_over_6n": [c / (6 * n) for n, c in zip(self.sizes, self.per_token)]}


SEARCH_DECADES = 6  # N* is searched this many decades either side of the sizes measured


def optimal(law: Law, cost: Cost, budgets: Sequence[float], sizes: Sequence[float]) -> list[dict[str, float]]:
    """For each budget C: N* = argmin_N L(N, C / c(N)), D* = C / c(N*) and L* = L(N*, D*); a dense search in log N
    refined by a bounded scalar minimisation."""
    lo, hi = np.log(min(sizes)) - SEARCH_DECADES * np.log(10), np.log(max(sizes)) + SEARCH_DECADES * np.log(10)
    grid = np.linspace(lo, hi, 4001)
    rows = []
    for c in budgets:
        loss = lambda x: float(law(np.exp(x), c / cost(np.exp(x))))
        values = law(np.exp(grid), c / cost(np.exp(grid)))
        i = int(np.argmin(values))
        bounds = (grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)])
        x = optimize.minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-10}).x
        n = float(np.exp(x))
        rows.append({"flops": float(c), "params": n, "tokens": float(c / cost(n)), "loss": loss(x)})
    return rows


def default_budgets(flops: np.ndarray) -> list[float]:
    """Every power of ten within the records' compute (the nearest one where none lies within)."""
    lo, hi = np.log10(flops.min()), np.log10(flops.max())
    decades = list(range(int(np.ceil(lo)), int(np.floor(hi)) + 1)) or [int(round((lo + hi) / 2))]
    return [float(10.0 ** k) for k in decades]


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of the log prediction and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(0)
    weights = np.exp(terms - top)
    total = weights.sum(0)
    r = top + np.log(total) - log_l
    weights /= total
    huber = np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))
    dr = np.clip(r, -delta, delta)
    grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
                     -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
    return float(huber.sum()), grad


def _grid_losses(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> np.ndarray:
    a, b, e, alpha, beta = (INIT_GRID[:, i:i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    r = np.abs(pred - log_l)
    return np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta)).sum(1)


def _minimise(starts: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    bounds = [(None, None)] * 3 + [EXPONENT_BOUNDS] * 2
    best, best_value = None, np.inf
    # L-BFGS-B's 5 x 5 LAPACK calls on a multi-threaded BLAS cost 10x more than on one thread, more on a busy CPU.
    with threadpool_limits(1):
        for start in starts:
            result = optimize.minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True,
                                       method="L-BFGS-B", bounds=bounds, options=TOLERANCES)
            if result.fun < best_value:
                best, best_value = result.x, result.fun
    return best


def _law(theta: np.ndarray) -> Law:
    a, b, e, alpha, beta = theta
    return Law(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), B=float(np.exp(b)), beta=float(beta))


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *, delta: float = DELTA,
            starts: np.ndarray | None = None) -> Law:
    """The Huber fit of L(N, D); `starts` (rows of a, b, e, alpha, beta) replace the grid's best points."""
    log_n, log_d, log_l = (np.log(np.asarray(v, float)) for v in (n, d, loss))
    if starts is None:
        starts = INIT_GRID[np.argsort(_grid_losses(log_n, log_d, log_l, delta))[:STARTS]]
    return _law(_minimise(starts, log_n, log_d, log_l, delta))


def _theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def bootstrap_laws(n: Sequence[float], d: Sequence[float], loss: Sequence[float], law: Law, *, samples: int = 200,
                   seed: int = 0, delta: float = DELTA) -> list[Law]:
    """The law refitted to runs resampled with replacement, `samples` times.

    Each refit is warm-started from the full fit: a resample's optimum lies near it, and a search of the whole
    grid of starts for every resample would cost 16x more.
    """
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, len(n), len(n))
        log_n, log_d, log_l = np.log(n[pick]), np.log(d[pick]), np.log(loss[pick])
        laws.append(_law(_minimise(_theta(law)[None], log_n, log_d, log_l, delta)))
    return laws


def interval(values: Sequence[float]) -> list[float]:
    """The 95% percentile interval."""
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def bootstrap(n: Sequence[float], d: Sequence[float], loss: Sequence[float], law: Law, *, samples: int = 200,
              seed: int = 0, delta: float = DELTA) -> dict[str, list[float]]:
    """95% percentile intervals of every key over bootstrap_laws."""
    draws = [x.as_dict() for x in bootstrap_laws(n, d, loss, law, samples=samples, seed=seed, delta=delta)]
    return {k: interval([x[k] for x in draws]) for k in KEYS}


@dataclasses.dataclass(frozen=True)
class IsoFlop:
    """Chinchilla's second approach on a grid: at each budget C, loss against N from each size's runs (log-log
    interpolation in C, never extrapolated), a parabola in log N, and its minimum N*(C)."""

    levels: list[float]
    curves: list[dict[str, list[float]]]  # per level: n, loss (interpolated), and the parabola's coefficients
    optimal_n: list[float | None]  # the minimum where it lies inside the sizes measured at that level
    a: float | None  # N* ~ C^a over the levels with an interior minimum
    b: float | None  # D* = C / c(N*) ~ C^b


def isoflop(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *, flops: Sequence[float] | None = None,
            cost: Cost = Cost(), levels: int = 8) -> IsoFlop | None:
    """The iso-FLOP view, or None unless the grid has at least 3 sizes with at least 3 budgets each. Runs are
    placed at their recorded `flops` (else 6ND), and D* = C / cost(N*)."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    c = 6 * n * d if flops is None else np.asarray(flops, float)
    sizes = [s for s in np.unique(n) if len(np.unique(d[n == s])) >= 3]
    if len(sizes) < 3:
        return None
    runs = {s: (np.log(c[n == s])[np.argsort(c[n == s])], np.log(loss[n == s])[np.argsort(c[n == s])])
            for s in sizes}
    candidates = np.linspace(np.log(c).min(), np.log(c).max(), 4 * levels)
    covered = [x for x in candidates if sum(lc[0] <= x <= lc[-1] for lc, _ in runs.values()) >= 3]
    if not covered:
        return None
    chosen = np.linspace(covered[0], covered[-1], min(levels, len(covered)))
    curves, optimal = [], []
    for x in chosen:
        at = [(s, float(np.exp(np.interp(x, lc, ll)))) for s, (lc, ll) in runs.items() if lc[0] <= x <= lc[-1]]
        ns, ls = np.array([s for s, _ in at]), np.array([v for _, v in at])
        coef = np.polyfit(np.log(ns), np.log(ls), 2) if len(at) >= 3 else np.full(3, np.nan)
        vertex = -coef[1] / (2 * coef[0]) if coef[0] > 0 else np.nan
        inside = np.log(ns).min() < vertex < np.log(ns).max()
        optimal.append(float(np.exp(vertex)) if inside else None)
        curves.append({"n": ns.tolist(), "loss": ls.tolist(), "parabola": coef.tolist()})
    known = [(lv, o) for lv, o in zip(np.exp(chosen), optimal) if o is not None]
    a = b = None
    if len(known) >= 2:
        level, best = np.log([k for k, _ in known]), np.array([o for _, o in known])
        a = float(np.polyfit(level, np.log(best), 1)[0])
        b = float(np.polyfit(level, level - np.log(cost(best)), 1)[0])
    return IsoFlop(levels=np.exp(chosen).tolist(), curves=curves, optimal_n=optimal, a=a, b=b)


# -- files ------------------------------------------------------------------------------------------------------
def read_results(path: str | os.PathLike, n_column: str = "params") -> dict[str, np.ndarray]:
    """The columns n (from n_column), tokens and loss of a results CSV, `size` where present, and `flops` where
    every run has it (the grid's analytic training FLOPs)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    for column in (n_column, "tokens", "loss"):
        if column not in columns:
            raise UserError(f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'})")
    out: dict[str, list[float]] = {"n": [], "tokens": [], "loss": []}
    for line, row in enumerate(rows, start=2):
        for key, column in (("n", n_column), ("tokens", "tokens"), ("loss", "loss")):
            try:
                value = float(row[column])
            except (TypeError, ValueError):
                value = float("nan")
            if not np.isfinite(value) or value <= 0:
                raise UserError(f"{path} line {line}: column {column!r} is {row[column]!r}, not a positive number")
            out[key].append(value)
    if len(rows) < 6:
        raise UserError(f"{path}: {len(rows)} runs; fitting 5 parameters needs at least 6")
    result = {k: np.array(v) for k, v in out.items()}
    if "flops" in columns:
        flops = []
        for line, row in enumerate(rows, start=2):
            try:
                flops.append(float(row["flops"]))
            except (TypeError, ValueError):
                flops.append(float("nan"))
            if not np.isfinite(flops[-1]) or flops[-1] <= 0:
                raise UserError(f"{path} line {line}: column 'flops' is {row['flops']!r}, not a positive number")
        result["flops"] = np.array(flops)
    result["label"] = np.array([row.get("size") or f"{float(row[n_column]):.3g}" for row in rows])
    return result


def fit_results(csv_path: str | os.PathLike, out: str | os.PathLike, *, n_column: str = "params",
                samples: int = 200, seed: int = 0, budgets: Sequence[float] = ()) -> dict:
    """fit.json, predictions.csv and the plots for a results CSV; returns fit.json's content. budgets: the
    compute budgets C of the `optimal` rows (default: every decade the records' compute spans)."""
    from labram_jax.scaling import plots

    data = read_results(csv_path, n_column)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    law = fit_law(data["n"], data["tokens"], data["loss"])
    flops = data.get("flops")
    cost = Cost.of_records(data["n"], data["tokens"], flops)
    iso = isoflop(data["n"], data["tokens"], data["loss"], flops=flops, cost=cost)
    budgets = list(budgets) or default_budgets(cost(data["n"]) * data["tokens"] if flops is None else flops)
    laws = bootstrap_laws(data["n"], data["tokens"], data["loss"], law, samples=samples, seed=seed)
    best = optimal(law, cost, budgets, data["n"])
    draws = [optimal(x, cost, budgets, data["n"]) for x in laws]
    for i, row in enumerate(best):
        row["ci"] = {k: interval([draw[i][k] for draw in draws]) for k in ("params", "tokens", "loss")}
    result = law.as_dict() | {
        "ci": {k: interval([x.as_dict()[k] for x in laws]) for k in KEYS},
        "cost": cost.as_dict(), "optimal": best,
        # An exponent at its bound means the grid does not resolve that axis (its term is flat or a step).
        "at_bound": [k for k in ("alpha", "beta") if min(abs(getattr(law, k) - b) for b in EXPONENT_BOUNDS) < 1e-6],
        "n_column": n_column, "runs": int(len(data["n"])), "huber_delta": DELTA, "bootstrap_samples": samples,
        "isoflop": None if iso is None else dataclasses.asdict(iso)}
    write_json(out / "fit.json", result)
    predicted = law(data["n"], data["tokens"])
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", n_column, "tokens", "loss", "predicted", "log_residual"])
        for row in zip(data["label"], data["n"], data["tokens"], data["loss"], predicted):
            writer.writerow([*row, float(np.log(row[3] / row[4]))])
    plots.write_all(out, data, law, iso, n_column, cost, best)
    return result


def summary(result: dict, out: str | os.PathLike) -> str:
    """The fitted numbers in one line, and a warning where an exponent ended at its bound."""
    line = f"fit: {json.dumps({k: round(result[k], 4) for k in KEYS})} -> {out}"
    for row in result["optimal"]:
        line += (f"\ncompute-optimal at C = {row['flops']:.3g} FLOPs (cost per token: {result['cost']['source']}): "
                 f"N* = {row['params']:.3g}, D* = {row['tokens']:.3g} tokens, loss {row['loss']:.4g}")
    if result["at_bound"]:
        line += (f"\nwarning: {', '.join(result['at_bound'])} at the bound of its search: the grid does not "
                 "resolve that axis (more sizes or budgets, or longer runs)")
    return line
