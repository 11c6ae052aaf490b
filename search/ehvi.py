"""Expected hypervolume improvement with the latency known: updp's default sampler.

The search has two objectives, the supernet score (up) and the latency (down), but only the score is
unknown before a trial: the latency predictor (the per-block table, or the fitted model) prices a plan in
microseconds. A general multi-objective sampler (NSGA-II, TPE, Optuna's GPSampler) models both, and
spends trials learning what the predictor already says. This sampler models the score alone: a Gaussian
process over the pruned-block bits (an RBF kernel with one length scale per block, plus a linear kernel:
pruning costs add up, and interact), fitted by marginal likelihood on the study's completed trials. Every
untried plan of the space (all of them up to ``max_candidates``; past that a seeded random pool plus the
neighbours of the current front) gets its expected hypervolume improvement, in closed form in 2-D, and the
trial takes the best. Plans running in other workers count as tried, at their predicted score.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from updp.core.errors import UpdpError
from updp.core.plan import PruningPlan
from updp.search.space import SearchSpace

__all__ = ["EHVISampler", "expected_improvement_2d", "GaussianProcess"]


class GaussianProcess:
    """GP regression on 0/1 features: ``amp * RBF(ARD) + lin * x.x' + noise``, fitted by marginal likelihood."""

    def __init__(self, x: np.ndarray, y: np.ndarray, warm: np.ndarray | None = None, steps: int = 60):
        self.x = torch.as_tensor(x, dtype=torch.float64)
        y = np.asarray(y, dtype=np.float64)
        self.mean, self.scale = float(y.mean()), float(y.std()) or 1.0
        self.y = torch.as_tensor((y - self.mean) / self.scale)
        d = self.x.shape[1]
        theta = torch.tensor(warm if warm is not None and len(warm) == d + 3 else
                             [0.0, *[0.0] * d, math.log(0.1), math.log(0.01)], dtype=torch.float64)
        self.theta = theta.requires_grad_(True)
        opt = torch.optim.LBFGS([self.theta], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self._nll()
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except RuntimeError:  # a Cholesky that failed mid line search: start again from the prior's centre
            self.theta = torch.tensor([0.0, *[0.0] * d, math.log(0.1), math.log(0.01)], dtype=torch.float64)
        if not torch.isfinite(self.theta).all():
            self.theta = torch.tensor([0.0, *[0.0] * d, math.log(0.1), math.log(0.01)], dtype=torch.float64)
        self.theta = self.theta.detach()
        k = self._kernel(self.x, self.x) + self._noise() * torch.eye(len(self.x), dtype=torch.float64)
        self.chol = torch.linalg.cholesky(k)
        self.alpha = torch.cholesky_solve(self.y[:, None], self.chol)

    def _parts(self):
        t = self.theta.clamp(-8.0, 6.0)
        return t[0].exp(), t[1:-2].exp(), t[-2].exp()

    def _noise(self):
        return self.theta[-1].clamp(-12.0, 2.0).exp() + 1e-6

    def _kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        amp, ls, lin = self._parts()
        d2 = torch.cdist(a / ls, b / ls).square()
        return amp * torch.exp(-0.5 * d2) + lin * (a @ b.T)

    def _nll(self) -> torch.Tensor:
        n = len(self.x)
        k = self._kernel(self.x, self.x) + self._noise() * torch.eye(n, dtype=torch.float64)
        chol = torch.linalg.cholesky(k)
        alpha = torch.cholesky_solve(self.y[:, None], chol)
        # weak log-normal priors keep length scales and amplitudes near the data's scale with few trials
        prior = 0.5 * ((self.theta[:-1] / 2.0) ** 2).sum()
        return 0.5 * (self.y[:, None] * alpha).sum() + chol.diagonal().log().sum() + prior

    @torch.no_grad()
    def predict(self, x: np.ndarray, observed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation, in the units of ``y``; with ``observed``, of a new observation
        (the fitted noise added: what a trial will report, the scoring images' sampling noise and all)."""
        xs = torch.as_tensor(x, dtype=torch.float64)
        mu, var = [], []
        for chunk in torch.split(xs, 8192):
            ks = self._kernel(chunk, self.x)
            mu.append(ks @ self.alpha[:, 0])
            v = torch.cholesky_solve(ks.T, self.chol)
            amp, _, lin = self._parts()
            prior = amp + lin * (chunk * chunk).sum(1)
            var.append((prior - (ks * v.T).sum(1)).clamp_min(1e-12))
        mu, var = torch.cat(mu), torch.cat(var) + (self._noise() if observed else 0.0)
        return (mu * self.scale + self.mean).numpy(), (var.sqrt() * self.scale).numpy()


def _front(scores: np.ndarray, latencies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated points (score up, latency down), sorted by latency ascending (scores then rise)."""
    order = np.lexsort((-scores, latencies))
    keep_s, keep_l, best = [], [], -np.inf
    for i in order:
        if scores[i] > best:
            keep_s.append(scores[i])
            keep_l.append(latencies[i])
            best = scores[i]
    return np.asarray(keep_s), np.asarray(keep_l)


def expected_improvement_2d(mu: np.ndarray, sd: np.ndarray, latency: np.ndarray, front_scores: np.ndarray,
                            front_latencies: np.ndarray, ref_score: float, ref_latency: float) -> np.ndarray:
    """Expected hypervolume gained by each candidate (score ~ N(mu, sd), latency known) over the given front.

    The region a candidate at latency L adds is, over every latency l in [L, ref_latency), the scores between
    the front's best at latency <= l (``ref_score`` where none is) and the candidate's: a sum over the front's
    latency steps of width x E[max(0, score - level)], each term in closed form.
    """
    scores, lat = _front(np.asarray(front_scores, float), np.asarray(front_latencies, float))
    inside = lat < ref_latency
    scores, lat = scores[inside], lat[inside]
    levels = np.concatenate([[ref_score], np.maximum(scores, ref_score)])
    lo = np.concatenate([[-np.inf], lat])
    hi = np.concatenate([lat, [ref_latency]])
    width = np.clip(hi[None, :] - np.maximum(lo[None, :], latency[:, None]), 0.0, None)
    sd = np.maximum(sd, 1e-9)[:, None]
    z = (mu[:, None] - levels[None, :]) / sd
    ei = (mu[:, None] - levels[None, :]) * _ncdf(z) + sd * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (width * np.maximum(ei, 0.0)).sum(1)


def _ncdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * torch.special.erfc(torch.as_tensor(-z / math.sqrt(2.0))).numpy()


class EHVISampler(optuna.samplers.BaseSampler):
    """Score modelled by a GP, latency by the predictor; each trial the untried plan of highest expected
    hypervolume improvement. The first ``startup`` completed trials (seed plans count) are random untried plans.

    ``latency`` prices a plan in ms (the objective's predictor); a plan it cannot price is not proposed.
    Objective latencies that are measured, not predicted, rescale the predictor by their median ratio.
    """

    def __init__(self, space: SearchSpace, mode: str, latency: Callable[[PruningPlan], float],
                 seed: int | None = None, startup: int = 8, max_candidates: int = 1 << 16, pool: int = 20000):
        self.space, self.mode, self.latency = space, mode, latency
        self.startup, self.max_candidates, self.pool = startup, max_candidates, pool
        self.rng = np.random.default_rng(seed)
        self._seed = seed
        self._plans: list[PruningPlan] | None = None
        self._bits: np.ndarray | None = None
        self._lat: np.ndarray | None = None
        self._index: dict[PruningPlan, int] = {}
        self._theta: np.ndarray | None = None

    def reseed_rng(self) -> None:
        self.rng = np.random.default_rng()

    def infer_relative_search_space(self, study, trial) -> dict:
        return self.space.distributions(self.mode)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return optuna.samplers.RandomSampler().sample_independent(study, trial, param_name, param_distribution)

    # --- candidates -----------------------------------------------------------------------------

    def _enumerate(self) -> list[PruningPlan]:
        if self.mode == "stages":
            stages = sorted(self.space.stages)
            return [self.space.from_params({f"stage{s}": k for s, k in zip(stages, counts)}, "stages")
                    for counts in itertools.product(*(range(self.space.cap(s) + 1) for s in stages))]
        per_stage = [[c for k in range(self.space.cap(s) + 1) for c in itertools.combinations(names, k)]
                     for s, names in self.space.stages.items()]
        return [self.space.plan(itertools.chain.from_iterable(p)) for p in itertools.product(*per_stage)]

    def _sampled(self) -> list[PruningPlan]:
        import random

        rng = random.Random(self._seed)
        return list(dict.fromkeys(self.space.repair(n for n in self.space.names if rng.random() < p)
                                  for p in np.linspace(0.05, 0.95, self.pool)))

    def _add(self, plans: list[PruningPlan]) -> None:
        new = [p for p in dict.fromkeys(plans) if p not in self._index]
        priced = []
        for p in new:
            try:
                priced.append((p, float(self.latency(p))))
            except (UpdpError, KeyError, ValueError):
                continue  # a block the predictor cannot price: its trial would fail
        if not priced:
            return
        names = self.space.names
        bits = np.array([[n in p for n in names] for p, _ in priced], dtype=np.float64)
        start = len(self._plans)
        self._plans += [p for p, _ in priced]
        self._bits = bits if self._bits is None else np.vstack([self._bits, bits])
        lat = np.array([ms for _, ms in priced])
        self._lat = lat if self._lat is None else np.concatenate([self._lat, lat])
        self._index.update({p: start + i for i, (p, _) in enumerate(priced)})

    def _candidates(self) -> None:
        if self._plans is None:
            self._plans = []
            small = self.space.size(self.mode) <= self.max_candidates
            self._add(self._enumerate() if small else [self.space.plan(), *self._sampled()])

    def _neighbours(self, plans: list[PruningPlan]) -> list[PruningPlan]:
        out = []
        for p in plans:
            for n in self.space.names:
                out.append(self.space.repair(p.pruned ^ {n}))
        return out

    # --- the proposal ---------------------------------------------------------------------------

    def sample_relative(self, study, trial, search_space: dict) -> dict:
        if not search_space:
            return {}
        from updp.search.study import trial_plan

        self._candidates()
        trials = study.get_trials(deepcopy=False)
        model = self.space.model
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
                and ("plan" in t.user_attrs or "pruned" in t.user_attrs)]
        tried = {trial_plan(t, model) for t in trials if "plan" in t.user_attrs or "pruned" in t.user_attrs}
        pending = {self.space.from_params(t.params, self.mode) for t in trials
                   if t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number != trial.number
                   and set(search_space) <= set(t.params)}
        tried |= pending
        if self.space.size(self.mode) > self.max_candidates and done:
            self._add(self._neighbours([trial_plan(t, model) for t in done]))
        free = np.array([p not in tried for p in self._plans])
        if not free.any():
            return {}  # every plan was tried: the objective answers the repeat from the study
        plans = [trial_plan(t, model) for t in done]
        known = [i for i, p in enumerate(plans) if p in self._index]
        if len(known) < max(self.startup, 2):
            pick = int(self.rng.choice(np.flatnonzero(free)))
            return self.space.params(self._plans[pick], self.mode)
        rows = [self._index[plans[i]] for i in known]
        scores = np.array([done[i].values[0] for i in known], dtype=float)
        observed = np.array([done[i].values[1] for i in known], dtype=float)
        # 1.0 when the predictor is the objective; measured latencies rescale it
        scale = float(np.median(observed / np.maximum(self._lat[rows], 1e-12)))
        gp = GaussianProcess(self._bits[rows], scores, self._theta)
        self._theta = gp.theta.numpy()
        idx = np.flatnonzero(free)
        mu, sd = gp.predict(self._bits[idx], observed=True)
        front_s, front_l = list(scores), list(observed)
        pend = [self._index[p] for p in pending if p in self._index]
        if pend:  # other workers' running plans, at their predicted score
            front_s += list(gp.predict(self._bits[pend])[0])
            front_l += list(self._lat[pend] * scale)
        ref_latency = 1.01 * float(max(self._lat.max() * scale, max(observed)))
        gain = expected_improvement_2d(mu, sd, self._lat[idx] * scale, np.array(front_s), np.array(front_l),
                                       float(scores.min()), ref_latency)
        best = idx[int(np.argmax(gain))] if gain.max() > 0 else idx[int(np.argmax(sd))]
        return self.space.params(self._plans[best], self.mode)
