"""Chinchilla scaling laws: fit L(N, D) = E + A / N^alpha + B / D^beta to runs, and plan the
compute-optimal N and D for a FLOP budget.

The fit is approach 3 of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models",
section 3.3 and appendix D.2). With a = log A, b = log B, e = log E it minimises, over the runs i,

    sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i),   delta = 1e-3,

with L-BFGS from each point of a grid of starts, keeping the best. Besiroglu et al. 2024
("Chinchilla Scaling: A replication attempt") refitted data read off the paper's figures and found
that the original optimiser had stopped before converging (a poor choice of loss scale: the mean,
not the sum, of the Huber terms) and that its intervals were implausibly narrow. Here the objective
is the sum, the tolerances are tight, and the intervals come from refitting resamples of the runs
(a bootstrap, as Besiroglu et al. do).

N is the parameters that take part in matmuls: all of a model's parameters except an untied input
embedding, whose rows are looked up, not multiplied (`Transformer.num_params(embedding=False)`).
That is Chinchilla's count (one vocabulary matrix: the output projection) and the N of C = 6 N D.
It keeps the vocabulary matrix, which Kaplan et al. 2020 left out; Pearce & Song 2024 ("Reconciling
Kaplan and Chinchilla Scaling Laws") traced much of the two papers' disagreement to that choice, and
it matters most for small models, where the vocabulary matrix is much of the model.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from stacklm.config import Config
from stacklm.errors import UserError
from stacklm.model.transformer import build_model
from stacklm.training.metrics import read_metrics
from stacklm.training.trainer import CONFIG_FILE

HUBER_DELTA = 1e-3
CONSTANTS = ("E", "A", "B", "alpha", "beta")
# The objective is small (a sum of Huber terms of ~1e-5 each), and SciPy's default ftol stops once
# an iteration gains less than 2e-9 in absolute terms: early, as Besiroglu et al. found the original
# fit had stopped.
TOLERANCES = {"ftol": 1e-12, "gtol": 1e-9}
BOOTSTRAP_STARTS = 12


@dataclass
class ScalingFit:
    """L(N, D) = E + A / N**alpha + B / D**beta; `ci` maps a constant's name to its (low, high)
    interval, empty when there is none."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    points: int = 0  # runs fitted; 0 for published constants

    def loss(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def exponents(self) -> tuple[float, float]:
        """(a, b) of N_opt ∝ C^a and D_opt ∝ C^b under C = 6 N D (Hoffmann et al., eq. 4)."""
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

    @property
    def theta(self) -> np.ndarray:
        """The fit's coordinates (a, b, e, alpha, beta) = (log A, log B, log E, alpha, beta)."""
        return np.array([*np.log([self.A, self.B, self.E]), self.alpha, self.beta])

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in CONSTANTS}
        out.update({f"{name}_ci": list(self.ci[name]) for name in CONSTANTS if name in self.ci})
        return {**out, "points": self.points}

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> ScalingFit:
        """The fit `stacklm scaling fit --json` printed; `where` names the source in errors."""
        if not isinstance(raw, dict) or any(name not in raw for name in CONSTANTS):
            raise UserError(f"{where}: expected the JSON line `stacklm scaling fit --json` prints, with keys "
                            f"{', '.join(CONSTANTS)}")
        values = {}
        for name in CONSTANTS:
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{where}: {name} is {value!r}; every constant of the law is a positive number")
            values[name] = float(value)
        ci = {name: tuple(raw[f"{name}_ci"]) for name in CONSTANTS if f"{name}_ci" in raw}
        return cls(**values, ci=ci, points=int(raw.get("points", 0)))


# Hoffmann et al. 2022 (appendix D.2) at the precision of the paper's TeX source: the text rounds
# them to E = 1.69, alpha = 0.34, beta = 0.28, and with those the compute-optimal N at Gopher's
# budget is 32B instead of the paper's 40B (the rounding bias Besiroglu et al. point out).
# Besiroglu et al. 2024: their refit (standard errors 0.03, 124.58, 1293.23, 0.02, 0.02).
PUBLISHED = {
    "chinchilla": ScalingFit(E=1.6934, A=406.4, B=410.7, alpha=0.3392, beta=0.2849),
    "besiroglu": ScalingFit(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}


@dataclass
class Allocation:
    """The compute-optimal split of a budget of `flops` = 6 N D."""

    flops: float
    N: float  # parameters
    D: float  # training tokens
    loss: float  # the law's loss at (N, D)

    @property
    def tokens_per_param(self) -> float:
        return self.D / self.N


def compute_optimal(flops: float, fit: ScalingFit) -> Allocation:
    """The N and D that minimise L(N, D) under C = 6 N D, in closed form (Hoffmann et al., eq. 4):
    N_opt = G (C/6)^a, D_opt = (C/6) / N_opt, G = (alpha A / (beta B))^(1 / (alpha + beta))."""
    a, _ = fit.exponents()
    with np.errstate(all="ignore"):  # a degenerate bootstrap refit's constants give inf or nan, not an error
        g = np.power(np.float64(fit.alpha) * fit.A / (fit.beta * fit.B), 1 / (fit.alpha + fit.beta))
        N = g * np.power(flops / 6, a)
        D = flops / 6 / N
        return Allocation(flops, N, D, fit.loss(N, D))


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
              delta: float) -> tuple[float, np.ndarray]:
    """sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) and its gradient in
    theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    n_term, d_term = a - alpha * log_n, b - beta * log_d  # log A / N^alpha, log B / D^beta
    lse = np.logaddexp(np.logaddexp(n_term, d_term), e)  # log L(N_i, D_i)
    r = lse - log_loss
    huber = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    # d Huber / dr = clip(r, -delta, delta); d LSE / d term = that term's share of L
    g = np.clip(r, -delta, delta)
    g_n, g_d = g * np.exp(n_term - lse), g * np.exp(d_term - lse)
    grad = np.array([g_n.sum(), g_d.sum(), g @ np.exp(e - lse), -(g_n @ log_n), -(g_d @ log_d)])
    return float(huber.sum()), grad


def paper_grid() -> np.ndarray:
    """Hoffmann et al.'s starting points, rows of (a, b, e, alpha, beta): alpha, beta in
    {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}; 4,500 in all."""
    scales, offsets, exponents = np.linspace(0, 25, 6), np.linspace(-1, 1, 5), np.linspace(0, 2, 5)
    mesh = np.meshgrid(scales, scales, offsets, exponents, exponents, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def fit_scaling_law(N, D, loss, delta: float = HUBER_DELTA, starts: np.ndarray | None = None) -> ScalingFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta to runs of N parameters trained on D tokens to a
    held-out `loss`: L-BFGS from each row of `starts` (default `paper_grid()`), keeping the best."""
    N, D, loss = (np.asarray(x, dtype=float) for x in (N, D, loss))
    if len(N) < len(CONSTANTS):
        raise UserError(f"{len(N)} points: the law has {len(CONSTANTS)} constants ({', '.join(CONSTANTS)}), "
                        f"so a fit needs at least {len(CONSTANTS)} runs, and many more to pin them down")
    for name, values, what in (("N", N, "model size"), ("D", D, "training length")):
        if len(np.unique(values)) < 2:
            raise UserError(f"every point has the same {name}: vary the {what} across the runs too")
    theta = minimise((np.log(N), np.log(D), np.log(loss)), paper_grid() if starts is None else starts, delta)
    return from_theta(theta, len(N))


def minimise(logs: tuple[np.ndarray, ...], starts: np.ndarray, delta: float) -> np.ndarray:
    best = None
    # SciPy's L-BFGS-B makes small BLAS calls; multithreaded OpenBLAS makes them ~100x slower on a
    # busy machine (scipy/scipy#22438)
    with threadpool_limits(limits=1, user_api="blas"):
        for start in starts:
            result = minimize(objective, start, args=(*logs, delta), jac=True, method="L-BFGS-B",
                              options=TOLERANCES)
            if best is None or result.fun < best.fun:
                best = result
    return best.x


def from_theta(theta: np.ndarray, points: int) -> ScalingFit:
    a, b, e, alpha, beta = (float(x) for x in theta)
    with np.errstate(over="ignore", under="ignore"):  # a refit to a degenerate resample can run off to e^1000
        A, B, E = (float(np.exp(x)) for x in (a, b, e))
    return ScalingFit(E=E, A=A, B=B, alpha=alpha, beta=beta, points=points)


def bootstrap(N, D, loss, fit: ScalingFit, samples: int = 200, seed: int = 0,
              delta: float = HUBER_DELTA) -> list[ScalingFit]:
    """Refits of the law to `samples` resamples of the runs, drawn with replacement.

    Each refit starts from `fit` (the fit to all the runs) and from BOOTSTRAP_STARTS rows of the
    paper's grid drawn at random, not from the whole grid: a resample moves the optimum only a
    little (about half of the grid's starts reach the best fit on their own), and 4,500 starts for
    each of 200 refits would take an hour.
    """
    N, D, loss = (np.asarray(x, dtype=float) for x in (N, D, loss))
    logs = np.stack([np.log(N), np.log(D), np.log(loss)])  # (3, n)
    rng = np.random.default_rng(seed)
    grid = paper_grid()
    refits = []
    for _ in range(samples):
        pick = rng.integers(0, len(N), len(N))
        starts = np.vstack([fit.theta, grid[rng.choice(len(grid), BOOTSTRAP_STARTS, replace=False)]])
        refits.append(from_theta(minimise(tuple(logs[:, pick]), starts, delta), len(N)))
    return refits


def intervals(refits: list[ScalingFit], level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each constant over bootstrap refits."""
    return {name: interval([getattr(f, name) for f in refits], level) for name in CONSTANTS}


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` of `values`, ends taken from the values themselves (no interpolation, so
    a degenerate refit's inf stays inf)."""
    tail = 50 * (1 - level)
    low, high = np.percentile(values, [tail, 100 - tail], method="inverted_cdf")
    return float(low), float(high)


def load_points(run_dirs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss) of stacklm run directories: N the parameters in matmuls (the module docstring),
    D the tokens trained up to the last validation, over all data-parallel ranks (as the trainer
    records it; for runs older than that record, its step x train.batch_size x train.grad_accum x
    data.seq_len, one process's), loss that validation's loss."""
    rows = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: no such run directory")
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"{run_dir} is not a stacklm run directory (no {CONFIG_FILE})")
        try:
            val = read_metrics(run_dir, "val")
        except FileNotFoundError:
            raise UserError(f"{run_dir} has no metrics.jsonl: train it first") from None
        except (ValueError, KeyError):
            raise UserError(f"{run_dir}/metrics.jsonl is not one JSON record per line") from None
        if not val:
            raise UserError(f"{run_dir}/metrics.jsonl has no validation loss (no record with split \"val\"): "
                            f"let the run finish; training validates at its last step")
        config = Config.load(run_dir / CONFIG_FILE)
        with torch.device("meta"):  # counts the parameters without allocating them
            n = build_model(config).num_params(embedding=False)
        train = config.train
        d = val[-1].get("trained_tokens") or val[-1]["step"] * train.batch_size * train.grad_accum * config.data.seq_len
        rows.append((n, d, val[-1]["loss"]))
    return split(rows)


def read_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss) from a CSV file whose header names the columns N, D and loss (others are ignored)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = reader.fieldnames or []
    missing = [name for name in ("N", "D", "loss") if name not in header]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)}; the header must name N, D and loss "
                        f"(it has: {', '.join(header) or 'nothing'})")
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            values = tuple(float(row[name]) for name in ("N", "D", "loss"))
        except (TypeError, ValueError):
            raise UserError(f"{path}, line {line}: N, D and loss must be numbers") from None
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise UserError(f"{path}, line {line}: N, D and loss must be positive")
        rows.append(values)
    return split(rows)


def split(rows: list[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N, D, loss = np.array(rows, dtype=float).reshape(-1, 3).T
    return N, D, loss


def read_fit(path: str | Path) -> ScalingFit:
    """The fit that `stacklm scaling fit --json` printed into a file."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise UserError(f"{path} is not JSON; expected the line `stacklm scaling fit --json` prints") from None
    return ScalingFit.from_dict(raw, str(path))


def fit_table(fit: ScalingFit, samples: int, level: float = 0.95) -> str:
    """The fit as text: each constant with its interval, then the compute-optimal exponents."""
    head = f"{level:.0%} interval ({samples} bootstrap resamples of the points)" if fit.ci else "interval"
    lines = [f"L(N, D) = E + A / N^alpha + B / D^beta, fitted to {fit.points} points",
             f"{'constant':<9} {'value':>10}  {head}"]
    for name in CONSTANTS:
        low, high = fit.ci.get(name, (None, None))
        interval = f"{low:.4g} - {high:.4g}" if low is not None else "-"
        lines.append(f"{name:<9} {getattr(fit, name):>10.4g}  {interval}")
    a, b = fit.exponents()
    lines.append(f"compute-optimal under C = 6 N D: N_opt ~ C^{a:.3f}, D_opt ~ C^{b:.3f}")
    return "\n".join(lines)
