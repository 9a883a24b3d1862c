"""The generator's entropy term, one estimator per function: ``train.entropy_estimator`` picks one.

MEG maximises H[G(Z)] = I(G(Z); Z) through a lower bound on the mutual information, estimated by
the statistics network T from pairs (x_i, z_i), x_i = G(z_i), and shuffled pairs (x_i, z_perm(i)):

    jsd      Deep InfoMax's Jensen-Shannon bound (MEG's own; models/objectives.py)
    dv       Donsker-Varadhan, E_P[T] - log E_Q[e^T], with MINE's moving-average gradient correction
    nwj      Nguyen-Wainwright-Jordan (f-GAN's KL bound), E_P[T] - e^-1 E_Q[e^T]
    infonce  van den Oord et al., each positive against K in-batch negatives; at most log(K + 1)
    smile    Song & Ermon's DV with the density ratio e^T clipped to [e^-tau, e^tau] (JS's gradient)
    vera     Grathwohl et al.'s variational entropy: G gets learned output noise, x = G(z) + sigma eps,
             and the gradient of H[q(x)] itself is estimated by importance sampling a posterior over z

Each MI function returns ``(objective, estimate)``: the generator loss subtracts ``objective`` (its
gradient is the estimator's), ``estimate`` is the value reported as ``mi_estimate``. For NWJ and
InfoNCE the two are the same tensor. Nothing here knows ranks or devices: DV's moving average is a
tensor the caller owns (updated in place, so a captured CUDA graph replays the update), and the
cross-rank mean it needs is a function the caller passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import VERAConfig
from models.objectives import StatisticsFn, at_least_fp32, jsd_mutual_information

ESTIMATORS = ("jsd", "dv", "nwj", "infonce", "smile", "vera")


# -- the MI bounds --------------------------------------------------------------------------------


def _scores(statistics: StatisticsFn, x: Tensor, z: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """T on the positives (x_i, z_i) and the shuffled pairs (x_i, z_perm(i)), one forward, in fp32."""
    n = x.shape[0]
    scores = at_least_fp32(statistics(torch.cat([x, x]), torch.cat([z, z[perm]])))
    return scores[:n], scores[n:]


def _log_mean_exp(t: Tensor, dim: int = 0) -> Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


def jsd_bound(statistics: StatisticsFn, x: Tensor, z: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    mi = jsd_mutual_information(statistics, x, z, perm)
    return mi, mi


def nwj_bound(statistics: StatisticsFn, x: Tensor, z: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """I_NWJ = E_P[T] - E_Q[e^(T - 1)] (the KL's f-divergence bound, Poole et al. 2019, eq. 7)."""
    positive, negative = _scores(statistics, x, z, perm)
    mi = positive.mean() - torch.exp(negative - 1.0).mean()
    return mi, mi


def smile_bound(statistics: StatisticsFn, x: Tensor, z: Tensor, perm: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """I_SMILE = E_P[T] - log E_Q[clip(e^T, e^-tau, e^tau)] (Song & Ermon 2020, eq. 16) as the value,
    with the Jensen-Shannon bound's gradient, as their own code trains the critic. The clipped bound
    differentiated as it stands is unbounded above in T (positives grow, the clipped negatives stop
    pulling back): measured on 25 Gaussians, its estimate reached 2.5e5 and the energy gap passed the
    divergence guard's bound at step 374 and again after each of 3 rollbacks, which stopped the run.
    So ``smile`` trains as ``jsd`` does and differs in the MI it reports."""
    positive, negative = _scores(statistics, x, z, perm)
    js = (-F.softplus(-positive)).mean() - F.softplus(negative).mean()
    mi = positive.mean() - _log_mean_exp(negative.clamp(-clip, clip))
    return js + (mi - js).detach(), mi


def infonce_bound(statistics: StatisticsFn, x: Tensor, z: Tensor, negatives: int) -> tuple[Tensor, Tensor]:
    """I_NCE = mean_i [T(x_i, z_i) - log mean_{k=0..K} e^T(x_i, z_(i+k))], K = ``negatives`` other
    latents of the batch (cyclic shifts: deterministic, so no permutation is drawn). At most log(K+1)."""
    n = x.shape[0]
    if not 1 <= negatives < n:
        raise ValueError(f"infonce needs 1 <= negatives < batch per rank ({n}), got {negatives}")
    shifts = torch.arange(negatives + 1, device=z.device)
    index = (torch.arange(n, device=z.device) + shifts[:, None]) % n  # row 0: the positives
    xs = x.unsqueeze(0).expand(negatives + 1, *x.shape).reshape(-1, *x.shape[1:])
    scores = at_least_fp32(statistics(xs, z[index.reshape(-1)])).view(negatives + 1, n)
    mi = (scores[0] - _log_mean_exp(scores, 0)).mean()
    return mi, mi


def new_dv_state(device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """DV's moving average as device tensors: ``log_ma`` = log of the average of E_Q[e^T] over the
    steps so far, ``count`` = steps seen (the first one sets the average)."""
    return {"log_ma": torch.zeros((), device=device), "count": torch.zeros((), device=device)}


def dv_bound(
    statistics: StatisticsFn,
    x: Tensor,
    z: Tensor,
    perm: Tensor,
    state: dict[str, Tensor],
    rate: float,
    mean_across_ranks: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Donsker-Varadhan, I_DV = E_P[T] - log E_Q[e^T], with MINE's corrected gradient:

        d objective = mean_i dT(x_i, z_i) - mean_i e^T(x_i, z_perm(i)) dT(x_i, z_perm(i)) / ma

    where ``ma`` is the moving average of E_Q[e^T] (this step's batch included), held in ``state`` and
    updated in place: ma <- (1 - rate) ma + rate * batch value (the first step: the batch value). The
    batch value is averaged over the ranks by ``mean_across_ranks``, so every rank holds the same
    average. ``objective``'s value is the DV estimate; only its gradient is corrected."""
    positive, negative = _scores(statistics, x, z, perm)
    log_batch = _log_mean_exp(negative)
    estimate = positive.mean() - log_batch
    with torch.no_grad():
        batch = log_batch.detach().double()
        if mean_across_ranks is not None:
            batch = mean_across_ranks(batch.exp()).log()
        batch = batch.float()
        log_ma, count = state["log_ma"], state["count"]
        blended = torch.logaddexp(log_ma + math.log1p(-rate), batch + math.log(rate)) if rate < 1 else batch
        log_ma.copy_(torch.where(count > 0, blended, batch))
        count.add_(1)
    # d exp(log_batch - log_ma) = (E_batch[e^T] / ma) d log_batch = E_batch[e^T dT] / ma.
    corrected = positive.mean() - torch.exp(log_batch - log_ma)
    objective = estimate.detach() + (corrected - corrected.detach())
    return objective, estimate


# -- VERA -----------------------------------------------------------------------------------------


class VERANoise(nn.Module):
    """VERA's two learned scales, in the statistics network's place: the generator's output noise
    sigma (one number, clamped to [noise_min, noise_max]) and the posterior's per-latent std eta.

    ``forward()`` returns (sigma, eta): they go through the module's call so that a DDP wrapper
    sees them used."""

    def __init__(self, z_dim: int, cfg: VERAConfig):
        super().__init__()
        # Shape (1,), not a 0-dim tensor: DeepSpeed's flat buffers cannot hold 0-dim parameters.
        self.log_sigma = nn.Parameter(torch.full((1,), math.log(cfg.noise_init)))
        self.log_eta = nn.Parameter(torch.full((z_dim,), math.log(cfg.posterior_init)))
        self.log_min, self.log_max = math.log(cfg.noise_min), math.log(cfg.noise_max)

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.log_sigma.clamp(self.log_min, self.log_max).exp(), self.log_eta.exp()


def _log_normal(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, diag(std^2)) summed over the last dimension."""
    d = x.shape[-1]
    std = std.expand_as(x) if std.dim() > 0 else std
    log_std = torch.log(std).sum(-1) if std.dim() > 0 else d * torch.log(std)
    return -0.5 * (((x - mean) / std) ** 2).sum(-1) - log_std - 0.5 * d * math.log(2 * math.pi)


def vera_entropy(
    generator_mean: Callable[[Tensor], Tensor],
    x: Tensor,
    z: Tensor,
    sigma: Tensor,
    eta: Tensor,
    samples: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """VERA's entropy-gradient surrogate for x = G(z) + sigma eps (Grathwohl et al. 2021, section 3).

    grad H[q] = -E_q[grad_x log q(x)^T dx], and grad_x log q(x) = E_q(z|x)[(G(z) - x)] / sigma^2 is
    estimated by self-normalised importance sampling with ``samples`` draws from xi(z | x) =
    N(z0, eta^2) (weights q(x | z) p(z) / xi(z | x)). Returns:
    - ``surrogate``: its gradient is that of -mean_i score_i . x_i with the score held constant (into G
      and sigma through x): the entropy's; its value is ``estimate``;
    - ``estimate``: -mean_i log q^(x_i), the importance-weighted estimate of H[q] (log q^ is a lower
      bound in expectation, so this leans high);
    - ``posterior_loss``: -ELBO(eta), one reparameterised draw; its gradient reaches eta only.
    ``generator_mean(z)`` is G(z) taking no parameter gradient (the caller detaches G's parameters).
    """
    n = x.shape[0]
    flat = at_least_fp32(x.flatten(1))
    sigma32, eta32 = at_least_fp32(sigma), at_least_fp32(eta)
    with torch.no_grad():
        x0, s, e = flat.detach(), sigma32.detach(), eta32.detach()
        zk = z.detach().float() + e * torch.randn(samples, *z.shape, device=z.device)
        mean = at_least_fp32(generator_mean(zk.flatten(0, 1).to(z.dtype))).flatten(1).view(samples, n, -1)
        zero = torch.zeros((), device=z.device)
        log_w = (
            _log_normal(x0, mean, s)
            + _log_normal(zk, zero, torch.ones((), device=z.device))
            - _log_normal(zk, z.detach().float(), e)
        )  # (samples, n)
        w = torch.softmax(log_w, dim=0)
        score = (w.unsqueeze(-1) * (mean - x0)).sum(0) / s**2
        estimate = -_log_mean_exp(log_w, 0).mean()
    surrogate = -(score * flat).sum(1).mean()
    surrogate = estimate + (surrogate - surrogate.detach())  # the value: H's estimate; the gradient: VERA's
    zp = z.detach().float() + eta32 * torch.randn_like(z, dtype=torch.float32)
    post_mean = at_least_fp32(generator_mean(zp.to(z.dtype))).flatten(1)
    elbo = (
        _log_normal(flat.detach(), post_mean, sigma32.detach())
        + _log_normal(zp, torch.zeros((), device=z.device), torch.ones((), device=z.device))
        + torch.log(eta32).sum()
        + 0.5 * z.shape[1] * (1 + math.log(2 * math.pi))
    )
    return surrogate, estimate, -elbo.mean()
