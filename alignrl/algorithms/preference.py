"""Objectives of the preference family, as pure functions of per-image denoising errors.

For one image x, a time t and a noise eps shared by the policy and the frozen reference::

    e_th(x)  = mean_dims((pred_theta(x_t, t) - target)^2)        (the parameterisation's target)
    e_ref(x) = the same with the reference
    D(x)     = e_th(x) - e_ref(x)     negative: the policy denoises x better than the reference did,
                                      i.e. its likelihood of x went up relative to the reference

Every loss below is written in these terms, per pair, list or image (shape (B,) tensors), so it is tested on
hand-made numbers and shared by every backbone (flow velocity, epsilon, v). Conventions follow the authors'
code; where the field has two conventions the function names the one it uses.

- ``dpo_loss``: Diffusion-DPO (SD1.5/SDXL) and Flow-DPO (SD3.5), the official ``-(beta/2)`` scaling
  (diffusers' example uses ``beta`` without the 1/2: beta_diffusers = beta_official / 2); SmPO passes its soft
  label weight ``10 (2p - 1)`` as ``weight``.
- ``kto_loss``: Diffusion-KTO with the batch reference point ``z = max(0, mean g)``, g = e_ref - e_th.
- ``rankdpo_loss``: RankDPO's listwise DPO with LambdaLoss weights (DCG gains of the labels, discounts of the
  ranks the current model's scores give).
- ``dro_loss``: Diffusion-DRO's hinge between an expert image and a policy sample.
- ``ddo_loss``: DDO's implicit discriminator d = -(e_th - e_ref) between data and reference samples.
- ``rwr_weights``: Flow-RWR's per-sample weights exp(r / beta), normalised over the batch.

The methods below the functions (``OfflineMethod`` and its subclasses) train on rows of an offline dataset
(``data.offline``): Diffusion-DPO, Flow-DPO and SmPO on pairs, Diffusion-KTO on labelled images, RankDPO on
ranked lists, SFT on image-caption sets, and on image-caption sets plus images they sample themselves each
iteration (``sample_ode``, no CFG): Diffusion-DRO (experts vs the policy's samples) and DDO (data vs the
reference's samples). The online methods (``OnlineDPO``, ``FlowRWR``) train on the rollouts' final images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from alignrl.algorithms.advantages import AdvantageResult
from alignrl.algorithms.base import Stateless, balanced_passes
from alignrl.errors import ConfigError
from alignrl.sampling.kernels import mean_over_dims
from alignrl.sampling.parameterisation import TIME_SAMPLINGS, deterministic_step, sample_t

# SmPO's PickScore cosine range over Pick-a-Pic v2 (its preprocessing's fixed min and max)
SMPO_SCORE_MIN = 0.11544
SMPO_SCORE_MAX = 0.28202


def dpo_loss(e_th_w: torch.Tensor, e_th_l: torch.Tensor, e_ref_w: torch.Tensor, e_ref_l: torch.Tensor,
             beta: float, weight: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, dict]:
    """Per-pair ``-log sigmoid(-(beta/2) weight [(e_th(w) - e_th(l)) - (e_ref(w) - e_ref(l))])``.

    The winner and loser must share t and eps. Returns the loss and diagnostics: ``implicit_acc`` (the policy
    prefers the winner more than the reference does), ``inside`` (the sigmoid's argument), the MSEs.
    """
    model_diff = e_th_w - e_th_l
    ref_diff = e_ref_w - e_ref_l
    inside = -(beta / 2) * weight * (model_diff - ref_diff)
    loss = F.softplus(-inside)  # = -log sigmoid(inside), stable for large |inside|
    with torch.no_grad():
        diag = {"implicit_acc": (inside > 0).float() + 0.5 * (inside == 0).float(), "inside": inside.detach(),
                "mse_winner": e_th_w.detach(), "mse_loser": e_th_l.detach(),
                "ref_mse_winner": e_ref_w.detach(), "ref_mse_loser": e_ref_l.detach()}
    return loss, diag


def smpo_soft_weight(score_w: torch.Tensor, score_l: torch.Tensor, lo: float = SMPO_SCORE_MIN,
                     hi: float = SMPO_SCORE_MAX) -> torch.Tensor:
    """SmPO's label weight ``10 (2p - 1)``, p = softmax(n_w, n_l)[w] of the min-max normalised reward scores
    (raw PickScore cosines by default): 0 for a tie, up to ~4.6 for the widest gap; negative when the 'winner'
    scores lower (SmPO orders pairs by the score, so that does not arise in its data)."""
    n_w, n_l = (score_w - lo) / (hi - lo), (score_l - lo) / (hi - lo)
    p = torch.sigmoid(n_w - n_l)
    return 10 * (2 * p - 1)


def kto_reference_point(g_sum: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """``z = max(0, mean g)`` over the global batch (pass the all-reduced sum and count), detached."""
    return torch.clamp(g_sum.detach() / count, min=0.0)


def kto_loss(e_th: torch.Tensor, e_ref: torch.Tensor, desirable: torch.Tensor, beta: float,
             z: torch.Tensor | float, lambda_d: float = 1.0, lambda_u: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Per-image Diffusion-KTO loss ``lambda_y (1 - sigmoid(beta (2y - 1)(g - z)))`` with g = e_ref - e_th.

    ``desirable`` is 1 (desirable) or 0 (undesirable); each image has its own t and eps; ``z`` comes from
    ``kto_reference_point`` over the global batch."""
    y = desirable.float()
    g = e_ref - e_th
    h = torch.sigmoid(beta * (2 * y - 1) * (g - z))
    lam = lambda_d * y + lambda_u * (1 - y)
    loss = lam * (1 - h)
    with torch.no_grad():
        # signed_margin: (2y - 1) g, positive where the policy (against the reference) fits desirable images better
        # and undesirable ones worse; unlike implicit_acc it does not depend on the reference point z
        diag = {"implicit_acc": ((2 * y - 1) * (g - z) > 0).float(), "reward_margin": g.detach(),
                "signed_margin": ((2 * y - 1) * g).detach()}
    return loss, diag


def rankdpo_loss(d: torch.Tensor, labels: torch.Tensor, beta: float, weighting: str = "lambda"
                 ) -> tuple[torch.Tensor, dict]:
    """RankDPO's loss of one list of k images of a prompt (one t and eps shared by all).

    ``d`` (k,) holds D(x_i) = e_th - e_ref, ``labels`` (k,) the label scores psi (higher is better). For every
    pair i above j by label: ``-w_ij log sigmoid(-(beta/2)(D_i - D_j))``, summed. ``weighting``:
    ``lambda`` (the paper's) ``w_ij = |G_i - G_j| |1/log2(1 + pi_i) - 1/log2(1 + pi_j)|`` with gains
    ``G = 2^psi - 1`` and pi the 1-based rank of the model score s = -D (current model, no gradient);
    ``none``: w = 1 (plain DPO over all ordered pairs; k = 2 is Diffusion-DPO)."""
    if weighting not in ("lambda", "none"):
        raise ConfigError(f"algorithm.weighting='{weighting}' is not known; use lambda or none")
    k = d.shape[0]
    with torch.no_grad():
        order = torch.argsort(-d.detach(), descending=True, stable=True)  # best model score first
        rank = torch.empty(k, dtype=torch.float64, device=d.device)
        rank[order] = torch.arange(1, k + 1, dtype=torch.float64, device=d.device)
        gain = 2.0 ** labels.double() - 1
        disc = 1.0 / torch.log2(1 + rank)
    above = labels.unsqueeze(1) > labels.unsqueeze(0)  # (i, j): i preferred over j
    if weighting == "lambda":
        w = (gain.unsqueeze(1) - gain.unsqueeze(0)).abs() * (disc.unsqueeze(1) - disc.unsqueeze(0)).abs()
    else:
        w = torch.ones(k, k, dtype=torch.float64, device=d.device)
    pair = F.softplus((beta / 2) * (d.unsqueeze(1) - d.unsqueeze(0)))  # -log sigmoid(-(beta/2)(D_i - D_j))
    loss = (w.to(pair.dtype) * pair * above).sum()
    with torch.no_grad():
        n_pairs = int(above.sum())
        agree = ((d.unsqueeze(1) < d.unsqueeze(0)) & above).sum()
        diag = {"pair_acc": (agree.float() / max(n_pairs, 1)), "pairs": torch.tensor(float(n_pairs))}
    return loss, diag


def dro_loss(e_th_expert: torch.Tensor, e_ref_expert: torch.Tensor, e_th_policy: torch.Tensor,
             e_ref_policy: torch.Tensor, margin: float = 1e-3) -> tuple[torch.Tensor, dict]:
    """Diffusion-DRO's hinge ``max(0, [D(expert) - D(policy sample)] + margin)`` (same prompt and t)."""
    d = (e_th_expert - e_ref_expert) - (e_th_policy - e_ref_policy)
    loss = torch.relu(d + margin)
    with torch.no_grad():
        diag = {"hinge_active": (d + margin > 0).float(), "ranking_gap": d.detach()}
    return loss, diag


def ddo_loss(d_data: torch.Tensor, d_ref_samples: torch.Tensor, alpha: float = 1.0, beta: float = 1.0
             ) -> tuple[torch.Tensor, dict]:
    """DDO: ``-log sigmoid(beta d(x_data)) - alpha log(1 - sigmoid(beta d(x_ref)))`` per (data, reference
    sample) pair, with the implicit discriminator d = log p_th - log p_ref estimated by ``-w(t)(e_th - e_ref)``
    (the caller passes d). At the reference d = 0 (likelihood ratio 1) and the loss is (1 + alpha) log 2."""
    loss = F.softplus(-beta * d_data) + alpha * F.softplus(beta * d_ref_samples)
    with torch.no_grad():
        diag = {"d_data": d_data.detach(), "d_ref_samples": d_ref_samples.detach(),
                "disc_acc": 0.5 * ((d_data > 0).float() + (d_ref_samples < 0).float())}
    return loss, diag


def rwr_weights(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Flow-RWR's weights ``exp(r / beta)`` normalised to mean 1 over the batch (a softmax times B)."""
    if beta <= 0:
        raise ConfigError(f"algorithm.beta={beta} must be > 0 for reward-weighted regression")
    return torch.softmax(rewards.double() / beta, dim=0).to(rewards.dtype) * rewards.shape[0]


def varied_groups(rewards: np.ndarray, keys, ok: np.ndarray) -> tuple[list[np.ndarray], float]:
    """The members (indices where ``ok``) of each prompt group whose rewards differ, and the fraction of groups
    that carry no preference (fewer than two members, or all rewards tied)."""
    keys = np.asarray(keys)
    groups = np.unique(keys)
    varied = []
    for k in groups:
        members = np.nonzero((keys == k) & ok)[0]
        if len(members) >= 2 and np.ptp(rewards[members]) > 0:
            varied.append(members)
    return varied, (len(groups) - len(varied)) / max(len(groups), 1)


LOG2 = math.log(2.0)


LOSS_GUIDANCE_TRAINS = ("both", "conditional")


@dataclass(frozen=True)
class LossGuidance:
    """The CFG of the predictions a loss scores: ``scale`` w (1: the conditional prediction alone) and which
    branches of ``v_u + w (v_c - v_u)`` the gradient reaches: ``both``, or ``conditional`` (the empty-prompt
    prediction is a constant, so the conditional one alone is fitted to ``v_u + (target - v_u) / w``)."""

    scale: float = 1.0
    trains: str = "both"


class _LossGuided:
    """The ``LossGuidance`` of a method's ``loss_guidance`` and ``loss_guidance_trains`` settings."""

    @property
    def guided_loss(self) -> LossGuidance:
        return LossGuidance(self.loss_guidance, self.loss_guidance_trains)


def _check_anchor(anchor: float) -> None:
    """The W2 anchor weight of SFT and Flow-RWR."""
    if anchor < 0:
        raise ConfigError(f"algorithm.anchor must be >= 0 (0: no anchor to the initial model), got {anchor}")


def _check_settings(lr: float, time_sampling: str, draws: int, draws_key: str, loss_guidance: float = 1.0,
                    trains: str = "both") -> None:
    if loss_guidance < 1:
        raise ConfigError(f"algorithm.loss_guidance must be >= 1 (1: the conditional prediction alone), got {loss_guidance}")
    if trains not in LOSS_GUIDANCE_TRAINS:
        raise ConfigError(f"algorithm.loss_guidance_trains='{trains}' is not known; use "
                          f"{' or '.join(LOSS_GUIDANCE_TRAINS)}")
    if lr <= 0:
        raise ConfigError(f"algorithm.lr must be > 0, got {lr}")
    if time_sampling not in TIME_SAMPLINGS:
        raise ConfigError(f"algorithm.time_sampling='{time_sampling}' is not known; use {' or '.join(TIME_SAMPLINGS)}")
    if draws < 1:
        raise ConfigError(f"algorithm.{draws_key} must be >= 1, got {draws}")


def draw_time_and_noise(g: torch.Generator, n: int, shape: tuple, time_sampling: str):
    """``n`` (index into the 1000-step training schedule, noise) draws from ``g``: idx = int(1000 u), u from
    ``sample_t``, then the noise."""
    idx = torch.clamp((sample_t(n, g, kind=time_sampling) * 1000).long(), 0, 999)
    return idx, torch.randn((n, *shape), generator=g)


def errors_at(ctx, x_t, timestep, target, cond, reference: bool, sigma: torch.Tensor, guidance: float = 1.0,
              gap: bool = False):
    """e_th (with gradient) and, with ``reference``, e_ref of the predictions at ``x_t`` (at flow times ``sigma``)
    against ``target``, each in the model's own objective (``Backbone.objective_weight``: the velocity error for
    flow models, the epsilon error for epsilon UNets, as their references train). ``guidance`` > 1 scores the
    classifier-free guided prediction ``v_u + w (v_c - v_u)`` instead of the conditional one: the model that
    samples at guidance w is the one fitted (``loss_guidance``); a ``LossGuidance`` also says whether the gradient
    reaches both branches or the conditional one alone (``loss_guidance_trains``). With ``gap``
    (needs ``reference``) the second value is instead the policy's squared distance to the reference's prediction,
    with gradient, in the same weighting (the W2 anchor of ``FlowRWR``)."""
    guide = guidance if isinstance(guidance, LossGuidance) else LossGuidance(float(guidance))
    guidance = guide.scale
    weight = ctx.backbone.objective_weight(sigma)
    with ctx.autocast():
        if guide.trains == "conditional" and ctx.backbone.cfg_active(guidance):
            pred = ctx.backbone.predict(x_t, timestep, cond, 1.0)
            with torch.no_grad():
                uncond = ctx.backbone.predict(x_t, timestep, ctx.backbone.negative_conditioning().expand(len(x_t)),
                                              1.0)
            pred = uncond + guidance * (pred - uncond)
        else:
            pred = ctx.backbone.predict(x_t, timestep, cond, guidance)
    e_th = mean_over_dims((pred.float() - target) ** 2) * weight
    second = None
    if reference:
        with torch.no_grad():
            ref = ctx.predict_reference(x_t, timestep, cond, guidance).float()
        second = mean_over_dims(((pred.float() - ref) if gap else (ref - target)) ** 2) * weight
    return e_th, second


def denoising_errors(ctx, schedule, x0, prompts, idx, eps, reference: bool, guidance: float = 1.0,
                     gap: bool = False):
    """Per-image errors of ``x0`` noised with ``eps`` at the schedule indices ``idx`` (the parameterisation's
    ``add_noise`` and ``target``), conditioned on ``prompts``, at classifier-free ``guidance`` (1: none);
    ``gap``: see ``errors_at``."""
    param = ctx.backbone.parameterisation
    sigma, timestep = schedule.sigmas[idx.to(ctx.device)], schedule.timesteps[idx.to(ctx.device)]
    return errors_at(ctx, param.add_noise(x0, eps, sigma), timestep, param.target(x0, eps, sigma),
                     ctx.backbone.encode_prompts(prompts), reference, sigma, guidance, gap)


def padding_errors(ctx, schedule, shape, reference: bool, guidance: float = 1.0) -> torch.Tensor:
    """The policy's (and with ``reference`` the reference's) forward on one blank image of latent ``shape``: a padding
    pass of a sharded step (``balanced_passes``), which reaches the same weight gathers as a real pass. Returns the
    policy's error (1,), with its graph; the caller backpropagates it times zero, or drops it without gradient."""
    x0 = torch.zeros(1, *shape, device=ctx.device)
    zero = torch.zeros(1, dtype=torch.long)
    e_th, _ = denoising_errors(ctx, schedule, x0, [""], zero, torch.zeros_like(x0), reference, guidance)
    return e_th


# ------------------------------------------------------------------------------------------------ methods
@dataclass
class OfflineMethod(_LossGuided, Stateless):
    """The training step shared by the methods that learn from an offline image dataset.

    Per row and iteration, ``draws_per_row`` (time, noise) pairs are drawn from a generator keyed by (seed,
    iteration, row position), so the draw does not depend on batching or ranks; the images of one row (a pair's
    winner and loser, a list's images) share them, as Diffusion-DPO and RankDPO require. Times are indices into
    the backbone's own 1000-step training schedule (its shift included): ``uniform`` (Diffusion-DPO's
    t ~ U{0..999}) or ``logit_normal`` (Flow-DPO's idx = int(1000 u), u ~ logit-normal(0, 1)). Each row's
    images are noised with the backbone's parameterisation and scored by their denoising error against its
    target (no CFG; ``prompt_dropout`` replaces that share of prompts by "" as the references do so CFG still
    works). ``row_losses`` turns the policy's and the reference's errors into one loss per row.
    """

    name: str = "offline"
    group_size: int = 1  # offline rows are not groups; kept for the protocol
    lr: float = 1e-5
    beta: float = 5000.0
    time_sampling: str = "uniform"
    draws_per_row: int = 1
    prompt_dropout: float = 0.0
    loss_guidance: float = 1.0
    loss_guidance_trains: str = "both"

    batch_kind: ClassVar[str] = "pairs"
    uses_reference: ClassVar[bool] = True
    _diag_keys: ClassVar[tuple] = ("policy_loss",)
    supports_sharding = True  # train_step balances its passes over processes (distributed=fsdp)

    def __post_init__(self):
        _check_settings(self.lr, self.time_sampling, self.draws_per_row, "draws_per_row", self.loss_guidance,
                        self.loss_guidance_trains)
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"algorithm.prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    @property
    def needs_reference(self) -> bool:
        return self.uses_reference

    def advantages(self, rewards, keys, per_reward=None, weights=None):
        raise ConfigError(f"algorithm '{self.name}' trains on an offline dataset and has no advantages")

    # -- the shared step ---------------------------------------------------------------------------------
    def draws(self, ctx, batch):
        """(R, n) schedule indices into the 1000-step schedule, (R, n, *latent) noise and (R,) prompt drops."""
        from alignrl.sampling.engine import sample_generators

        shape = tuple(batch.latents.shape[2:])
        idx = torch.empty((len(batch), self.draws_per_row), dtype=torch.long)
        eps = torch.empty((len(batch), self.draws_per_row, *shape))
        drop = torch.zeros(len(batch), dtype=torch.bool)
        for r, g in enumerate(sample_generators(ctx.seed * 13 + 7, ctx.iteration, batch.global_index.tolist())):
            idx[r], eps[r] = draw_time_and_noise(g, self.draws_per_row, shape, self.time_sampling)
            drop[r] = bool(torch.rand((), generator=g) < self.prompt_dropout)
        return idx, eps, drop

    def augment(self, ctx, schedule, batch):
        """The batch the step trains on; methods that add images of their own sampling (DRO's policy negatives,
        DDO's reference samples) add them here, as extra images of each row. The batch itself by default."""
        return batch

    def errors(self, ctx, schedule, batch, rows, x0, prompts, idx, eps, reference: bool):
        """Per-image denoising errors e_th (with gradient) and, with ``reference``, e_ref of the images of
        ``rows`` (flattened row-major into ``x0``)."""
        return denoising_errors(ctx, schedule, x0, prompts, idx, eps, reference, self.guided_loss)

    def prepare_chunk(self, ctx, schedule, batch, rows, idx, eps, prompts) -> dict:
        """Per optimizer step, before its losses (KTO's reference point); nothing by default."""
        return {}

    def padding_errors(self, ctx, schedule, batch) -> torch.Tensor:
        """A padding pass of this method (the reference's forward too when it uses one)."""
        return padding_errors(ctx, schedule, tuple(batch.latents.shape[2:]), self.needs_reference, self.guided_loss)

    def row_losses(self, batch, rows, e_th, e_ref, extra: dict):
        """(len(rows),) losses and per-row diagnostics from (len(rows), k) errors."""
        raise NotImplementedError

    def train_step(self, batch, adv, ctx) -> dict:
        schedule = ctx.backbone.make_schedule(1000)  # training times: the scheduler's own grid
        batch = self.augment(ctx, schedule, batch)
        idx, eps, drop = self.draws(ctx, batch)
        eps = eps.to(ctx.device)
        prompts = ["" if d else p for p, d in zip(batch.prompts, drop.tolist())]
        k = batch.latents.shape[1]
        ctx.denoiser.train()
        sums = {key: 0.0 for key in self.diagnostics}
        count, grad_norms = 0, []
        for epoch in range(ctx.inner_epochs):
            for chunk in ctx.update_chunks(batch.global_index, epoch):
                total = float(ctx.all_reduce_sum(torch.tensor([float(len(chunk) * self.draws_per_row)],
                                                               dtype=torch.float64, device=ctx.device)).item())
                if total == 0:
                    continue
                extra = self.prepare_chunk(ctx, schedule, batch, chunk, idx, eps, prompts)
                passes = [(mb, d) for mb in chunk.split(ctx.train_batch_size) if len(mb) for d in range(self.draws_per_row)]
                for (mb, d), real in balanced_passes(passes, ctx, (None, 0)):
                    if not real:  # distributed=fsdp: another process has more rows; the same gathers, no gradient
                        ctx.backward(self.padding_errors(ctx, schedule, batch).sum() * 0.0)
                        continue
                    x0 = batch.latents[mb].to(ctx.device).float().flatten(0, 1)  # (B k, ...)
                    rows_prompts = [prompts[int(r)] for r in mb for _ in range(k)]
                    i_d = idx[mb, d].repeat_interleave(k)
                    e_d = eps[mb.to(ctx.device), d].repeat_interleave(k, dim=0)  # shared by a row's images
                    e_th, e_ref = self.errors(ctx, schedule, batch, mb, x0, rows_prompts, i_d, e_d,
                                              self.needs_reference)
                    e_th = e_th.view(len(mb), k)
                    e_ref = e_ref.view(len(mb), k) if e_ref is not None else None
                    loss, diag = self.row_losses(batch, mb, e_th, e_ref, extra)
                    ctx.backward(loss.sum() / total)
                    diag["policy_loss"] = loss.detach()
                    for key in self.diagnostics:
                        sums[key] += float(diag[key].float().sum())
                    count += len(mb)
                grad_norms.append(ctx.optimizer_step())
        return ctx.summarise(sums, count, 0.0, grad_norms)


@dataclass
class DiffusionDPO(OfflineMethod):
    """Diffusion-DPO (pairs, winner first): ``dpo_loss`` with the official -(beta/2) scaling."""

    name: str = "diffusion_dpo"
    lr: float = 2.048e-5  # the paper's effective rate: 1e-8 x 2048 pairs (--scale_lr)
    beta: float = 5000.0
    prompt_dropout: float = 0.2

    batch_kind: ClassVar[str] = "pairs"
    _diag_keys: ClassVar[tuple] = ("policy_loss", "implicit_acc", "mse_winner", "mse_loser")

    def row_losses(self, batch, rows, e_th, e_ref, extra):
        return dpo_loss(e_th[:, 0], e_th[:, 1], e_ref[:, 0], e_ref[:, 1], self.beta)


@dataclass
class FlowDPO(DiffusionDPO):
    """Flow-DPO: the same loss on a flow model, times from the logit-normal density (flow_grpo's DPO script)."""

    name: str = "flow_dpo"
    lr: float = 3e-4  # LoRA r32 (the reference's SD3.5 setting)
    beta: float = 100.0
    time_sampling: str = "logit_normal"
    prompt_dropout: float = 0.0


@dataclass
class DiffusionKTO(OfflineMethod):
    """Diffusion-KTO (labels): g = e_ref - e_th against the reference point z = max(0, mean g) of the
    optimizer step's rows over all ranks (computed without gradient before the step's losses)."""

    name: str = "diffusion_kto"
    lr: float = 1e-7
    beta: float = 1000.0
    prompt_dropout: float = 0.2
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0

    batch_kind: ClassVar[str] = "labels"
    _diag_keys: ClassVar[tuple] = ("policy_loss", "implicit_acc", "reward_margin", "signed_margin")

    def prepare_chunk(self, ctx, schedule, batch, rows, idx, eps, prompts):
        g_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        passes = [(mb, d) for mb in rows.split(ctx.train_batch_size) if len(mb) for d in range(self.draws_per_row)]
        with torch.no_grad():
            for (mb, d), real in balanced_passes(passes, ctx, (None, 0)):
                if not real:  # distributed=fsdp: the gathers of a pass another process runs
                    self.padding_errors(ctx, schedule, batch)
                    continue
                x0 = batch.latents[mb, 0].to(ctx.device).float()
                e_th, e_ref = self.errors(ctx, schedule, batch, mb, x0, [prompts[int(r)] for r in mb],
                                          idx[mb, d], eps[mb.to(ctx.device), d], True)
                g_sum += (e_ref - e_th).double().sum()
        n = ctx.all_reduce_sum(torch.tensor([float(len(rows) * self.draws_per_row)], dtype=torch.float64,
                                            device=ctx.device))
        g_total = ctx.all_reduce_sum(g_sum.reshape(1))
        return {"z": kto_reference_point(g_total, n.clamp(min=1.0)).float().reshape(())}

    def row_losses(self, batch, rows, e_th, e_ref, extra):
        return kto_loss(e_th[:, 0], e_ref[:, 0], batch.labels[rows].to(e_th.device), self.beta, extra["z"],
                        self.lambda_desirable, self.lambda_undesirable)


@dataclass
class RankDPO(OfflineMethod):
    """RankDPO (lists with label scores): ``rankdpo_loss`` per list, all images of a list sharing (t, eps)."""

    name: str = "rankdpo"
    lr: float = 2.048e-5
    beta: float = 5000.0
    weighting: str = "lambda"

    batch_kind: ClassVar[str] = "lists"
    _diag_keys: ClassVar[tuple] = ("policy_loss", "pair_acc")

    def __post_init__(self):
        super().__post_init__()
        if self.weighting not in ("lambda", "none"):
            raise ConfigError(f"algorithm.weighting='{self.weighting}' is not known; use lambda or none")

    def row_losses(self, batch, rows, e_th, e_ref, extra):
        labels = batch.scores[rows].to(e_th.device)
        losses, accs = [], []
        for r in range(len(rows)):
            loss, diag = rankdpo_loss(e_th[r] - e_ref[r], labels[r], self.beta, self.weighting)
            losses.append(loss)
            accs.append(diag["pair_acc"])
        return torch.stack(losses), {"pair_acc": torch.stack(accs)}


@dataclass
class SmPO(DiffusionDPO):
    """SmPO-Diffusion: Diffusion-DPO with a soft preference label and inversion noise.

    The label weight ``10 (2p - 1)`` (``smpo_soft_weight``) comes from the pair's reward scores (min-max normalised
    with the PickScore range by default; ``score_min``/``score_max`` for another reward), so near-ties carry almost
    no weight. ``noise: inversion`` (the reference's): each image is inverted by the current policy (no gradient,
    conditional, no CFG) along the probability-flow ODE over a coarse grid of ``inversion_steps`` up to the last
    grid time below t, with one ReNoise refinement per step (the two velocities averaged); the inverted latent is
    the model input at t and the noise is backed out with t, as the reference does with abar_t (the input sits on
    a grid time below t). ``noise: forward`` uses fresh noise instead (Diffusion-DPO with soft labels).
    """

    name: str = "smpo"
    beta: float = 2000.0
    prompt_dropout: float = 0.0
    noise: str = "inversion"
    inversion_steps: int = 5
    score_min: float = SMPO_SCORE_MIN
    score_max: float = SMPO_SCORE_MAX

    _diag_keys: ClassVar[tuple] = ("policy_loss", "implicit_acc", "label_weight")

    def __post_init__(self):
        super().__post_init__()
        if self.noise not in ("inversion", "forward"):
            raise ConfigError(f"algorithm.noise='{self.noise}' is not known; use inversion or forward")
        if self.inversion_steps < 1:
            raise ConfigError(f"algorithm.inversion_steps must be >= 1, got {self.inversion_steps}")
        if self.score_max <= self.score_min:
            raise ConfigError("algorithm.score_max must be above algorithm.score_min")

    def errors(self, ctx, schedule, batch, rows, x0, prompts, idx, eps, reference: bool):
        if self.noise == "forward":
            return super().errors(ctx, schedule, batch, rows, x0, prompts, idx, eps, reference)
        backbone = ctx.backbone
        param = backbone.parameterisation
        sigma = schedule.sigmas[idx.to(ctx.device)]
        timestep = schedule.timesteps[idx.to(ctx.device)]
        cond = backbone.encode_prompts(prompts)
        x_inv = self._invert(ctx, schedule, x0, cond, sigma)
        t = sigma.view(-1, *([1] * (x0.ndim - 1)))
        eps_inv = (x_inv - (1 - t) * x0) / t.clamp(min=1e-4)  # the noise that puts x0 at x_inv at time t
        return errors_at(ctx, x_inv, timestep, param.target(x0, eps_inv, sigma), cond, reference, sigma,
                         self.guided_loss)

    @torch.no_grad()
    def _invert(self, ctx, schedule, x0, cond, sigma):
        """The probability-flow ODE from the data (sigma 0) up the grid k / inversion_steps, stopping at the last
        grid time below each image's sigma; one ReNoise refinement per step."""
        backbone = ctx.backbone
        grid = torch.linspace(0.0, 1.0, self.inversion_steps + 1, device=x0.device)
        x = x0.clone()
        s_model = schedule.sigmas.to(x0.device)
        t_model = schedule.timesteps.to(x0.device)

        def velocity(x_in, s):  # the model at sigma s (its timestep: the nearest training time)
            j = torch.argmin((s_model[:-1].unsqueeze(0) - s.unsqueeze(1)).abs(), dim=1)
            with ctx.autocast():
                return backbone.predict(x_in, t_model[j], cond, 1.0).float()

        for a, b in zip(grid[:-1], grid[1:]):
            live = b < sigma  # this step stays below the image's t
            if not bool(live.any()):
                break
            s_a, s_b = torch.full_like(sigma, float(a)), torch.full_like(sigma, float(b))
            v_a = velocity(x, s_a)
            first = x + (b - a) * v_a
            v_b = velocity(first, s_b)
            step = x + (b - a) * (v_a + v_b) / 2  # ReNoise: the velocities at both ends averaged
            mask = live.view(-1, *([1] * (x0.ndim - 1))).float()
            x = mask * step + (1 - mask) * x
        return x

    def row_losses(self, batch, rows, e_th, e_ref, extra):
        if batch.scores is None:
            raise ConfigError(f"algorithm '{self.name}' needs each pair's reward scores (winner_score/loser_score or "
                              f"score_0/score_1 in the dataset; `alignrl data` writes them)")
        scores = batch.scores[rows].to(e_th.device)
        weight = smpo_soft_weight(scores[:, 0], scores[:, 1], self.score_min, self.score_max)
        loss, diag = dpo_loss(e_th[:, 0], e_th[:, 1], e_ref[:, 0], e_ref[:, 1], self.beta, weight)
        diag["label_weight"] = weight.detach()
        return loss, diag


@dataclass
class SFT(OfflineMethod):
    """Supervised fine-tuning: the plain denoising loss on an image-caption set. ``anchor`` > 0 adds
    ``anchor * |v_th - v_ref|^2`` to the frozen initial model's prediction at the same noised point (the W2 anchor
    of ``FlowRWR``; 0, the default: plain SFT, no reference kept)."""

    name: str = "sft"
    lr: float = 1e-5
    beta: float = 0.0
    time_sampling: str = "logit_normal"
    anchor: float = 0.0

    batch_kind: ClassVar[str] = "captions"
    uses_reference: ClassVar[bool] = False
    _diag_keys: ClassVar[tuple] = ("policy_loss", "anchor_gap")

    def __post_init__(self):
        super().__post_init__()
        _check_anchor(self.anchor)

    @property
    def needs_reference(self) -> bool:
        return self.anchor > 0  # the frozen initial model, only for the anchor

    def errors(self, ctx, schedule, batch, rows, x0, prompts, idx, eps, reference: bool):
        """e_th and, with the anchor, the squared gap to the initial model's prediction at the same point."""
        return denoising_errors(ctx, schedule, x0, prompts, idx, eps, reference, self.guided_loss, gap=reference)

    def row_losses(self, batch, rows, e_th, e_ref, extra):
        if e_ref is None:
            return e_th[:, 0], {"anchor_gap": torch.zeros_like(e_th[:, 0])}
        return e_th[:, 0] + self.anchor * e_ref[:, 0], {"anchor_gap": e_ref[:, 0].detach()}


@torch.no_grad()
def sample_ode(ctx, prompts: list[str], x_T: torch.Tensor, steps: int, *, reference: bool = False,
               record: torch.Tensor | None = None, guidance: float = 1.0):
    """Samples of the probability-flow ODE from ``x_T`` over the backbone's ``steps``-step schedule, at CFG
    scale ``guidance`` (1: none, the references' negatives), with the live policy or (``reference``) the frozen
    reference. Each step is the deterministic DDIM form of
    the backbone's parameterisation (x0 and eps from the prediction, renoised at the next time; Euler for flow
    models). ``x_T`` and the result are in the model's own latents, the recorded latents in the flow frame the
    steps run in. ``record`` (B,) asks for each sample's (latent, model timestep, prediction) at that step index.
    Returns the final latents and, with ``record``, the three recorded tensors."""
    backbone = ctx.backbone
    param = backbone.parameterisation
    schedule = backbone.make_schedule(steps).to(x_T.device)
    cond = backbone.encode_prompts(prompts)
    x = backbone.to_frame(x_T.float(), schedule.sigmas[0])
    rec = (torch.empty_like(x), torch.empty(len(x), device=x.device), torch.empty_like(x)) if record is not None \
        else None
    for i in range(steps):
        s, s_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        timestep = schedule.timesteps[i].expand(len(x))
        if reference:
            pred = ctx.predict_reference(x, timestep, cond, guidance).float()
        else:
            with ctx.autocast():
                pred = backbone.predict(x, timestep, cond, guidance).float()
        if rec is not None:
            hit = (record.to(x.device) == i)
            rec[0][hit], rec[1][hit], rec[2][hit] = x[hit], schedule.timesteps[i], pred[hit]
        x = deterministic_step(param, x, pred, s, s_next)
    x = backbone.from_frame(x, schedule.sigmas[-1])
    return (x, *rec) if rec is not None else x


class _SamplesNegatives:
    """Shared by DRO and DDO: each row's own sample of its prompt, drawn without gradient in chunks of the
    train batch, from an initial noise (and a recorded step) keyed by (seed, iteration, row position)."""

    supports_sharding = True  # the sampling chunks and the step's passes are balanced over processes (fsdp)

    sample_steps: int
    sample_guidance: float

    def __post_init__(self):
        super().__post_init__()
        if self.sample_steps < 1:
            raise ConfigError(f"algorithm.sample_steps must be >= 1, got {self.sample_steps}")
        if self.sample_guidance < 1:
            raise ConfigError(f"algorithm.sample_guidance must be >= 1 (1: no CFG, the references' negatives), "
                              f"got {self.sample_guidance}")

    def _row_generators(self, ctx, batch):
        from alignrl.sampling.engine import sample_generators

        return sample_generators(ctx.seed * 19 + 5, ctx.iteration, batch.global_index.tolist())

    def _sample_rows(self, ctx, batch, reference: bool, record: bool):
        """Each row's sample (and with ``record`` its recorded step's latent, model timestep, prediction and the
        step index): the initial noise first, then the step, from the row's generator."""
        shape = tuple(batch.latents.shape[2:])
        x_T, steps = [], []
        for g in self._row_generators(ctx, batch):
            x_T.append(torch.randn(shape, generator=g))
            steps.append(torch.randint(self.sample_steps, (), generator=g) if record else torch.tensor(-1))
        x_T, step = torch.stack(x_T), torch.stack(steps)
        ctx.denoiser.eval()
        outs = []
        mbs = [mb for mb in torch.arange(len(batch)).split(ctx.train_batch_size) if len(mb)]
        for mb, real in balanced_passes(mbs, ctx, None):
            if not real:  # distributed=fsdp: the forwards of a chunk another process samples; nothing kept
                sample_ode(ctx, [""], torch.zeros(1, *shape, device=ctx.device), self.sample_steps,
                           reference=reference, guidance=self.sample_guidance)
                continue
            out = sample_ode(ctx, [batch.prompts[int(r)] for r in mb], x_T[mb].to(ctx.device), self.sample_steps,
                             reference=reference, record=step[mb] if record else None,
                             guidance=self.sample_guidance)
            outs.append(out if isinstance(out, tuple) else (out,))
        ctx.denoiser.train()
        return [torch.cat(parts) for parts in zip(*outs)] + ([step] if record else [])


@dataclass
class DiffusionDRO(_SamplesNegatives, OfflineMethod):
    """Diffusion-DRO: expert images (a captions dataset) ranked above the policy's own samples of the same prompt,
    ``dro_loss``'s hinge ``max(0, [D(expert) - D(sample)] + margin)`` against the frozen reference.

    Each iteration, every expert row gets a fresh negative: the policy (no gradient, no CFG) samples the row's
    prompt over ``sample_steps`` ODE steps and one step, drawn uniformly per row, is recorded with its latent and
    the sampler's own prediction there. The policy side of the loss is the denoising error at that latent
    against that prediction (the reference's target: the sampling copy's prediction, not a forward noise); the
    expert is noised with a fresh eps at the same time (the nearest of the 1000 training times). As in the
    reference, the sampling copy is the policy as it stood when the iteration began (refreshed once per
    iteration; with one optimizer step per iteration that is each optimizer step, the reference's cadence), so
    the policy term's gradient is zero at the first step and acts through the hinge and the lag. Differences:
    an Euler/DDIM ODE instead of DPM-Solver++, no per-trajectory time jitter, no replay buffer of 4
    trajectories (each iteration samples its own negatives).
    """

    name: str = "diffusion_dro"
    lr: float = 1e-4
    beta: float = 0.0  # unused: the hinge has no temperature
    margin: float = 1e-3
    sample_steps: int = 20
    sample_guidance: float = 1.0  # CFG of the negatives' sampling: 1 the reference's (none)
    prompt_dropout: float = 0.2

    batch_kind: ClassVar[str] = "captions"
    _diag_keys: ClassVar[tuple] = ("policy_loss", "hinge_active", "ranking_gap")

    def __post_init__(self):
        super().__post_init__()
        if self.margin < 0:
            raise ConfigError(f"algorithm.margin must be >= 0, got {self.margin}")

    def augment(self, ctx, schedule, batch):
        _, x_t, timestep, pred, step = self._sample_rows(ctx, batch, reference=False, record=True)
        sampled_sigma = ctx.backbone.make_schedule(self.sample_steps).sigmas.to(x_t.device)[step.to(x_t.device)]
        idx = torch.argmin((schedule.sigmas[:-1].to(x_t.device).unsqueeze(0) - sampled_sigma.unsqueeze(1)).abs(),
                           dim=1)
        latents = torch.stack([batch.latents[:, 0], x_t.to(batch.latents.dtype).cpu()], dim=1)
        return replace(batch, latents=latents,
                       extra={**batch.extra, "idx": idx.cpu(), "timestep": timestep, "target": pred})

    def draws(self, ctx, batch):
        idx, eps, drop = super().draws(ctx, batch)
        idx[:] = batch.extra["idx"].unsqueeze(1)  # the expert is noised at its negative's time
        return idx, eps, drop

    def errors(self, ctx, schedule, batch, rows, x0, prompts, idx, eps, reference: bool):
        param = ctx.backbone.parameterisation
        b, dev = len(rows), ctx.device
        pair = x0.view(b, 2, *x0.shape[1:])
        idx0 = idx.view(b, 2)[:, 0].to(dev)
        eps0 = eps.view(b, 2, *eps.shape[1:])[:, 0]
        sigma = schedule.sigmas[idx0]
        rows_dev = rows.to(batch.extra["target"].device)
        x_t = torch.stack([param.add_noise(pair[:, 0], eps0, sigma), pair[:, 1]], dim=1).flatten(0, 1)
        target = torch.stack([param.target(pair[:, 0], eps0, sigma), batch.extra["target"][rows_dev].to(dev)],
                             dim=1).flatten(0, 1)
        timestep = torch.stack([schedule.timesteps[idx0], batch.extra["timestep"][rows_dev].to(dev)], dim=1).flatten()
        return errors_at(ctx, x_t, timestep, target, ctx.backbone.encode_prompts(prompts), reference,
                         sigma.repeat_interleave(2), self.guided_loss)

    def row_losses(self, batch, rows, e_th, e_ref, extra):
        return dro_loss(e_th[:, 0], e_ref[:, 0], e_th[:, 1], e_ref[:, 1], self.margin)


@dataclass
class DDO(_SamplesNegatives, OfflineMethod):
    """DDO: the policy as an implicit discriminator ``d(x) = -(e_th(x) - e_ref(x))`` (the log-likelihood ratio
    to the reference, up to scale) between data images (a captions dataset) and the reference's own samples,
    ``ddo_loss``: ``-log sigmoid(beta d(data)) - alpha log(1 - sigmoid(beta d(sample)))``; alpha = 1 makes
    p_data the optimum.

    Each iteration, every data row gets one reference sample of its prompt (no gradient, no CFG, ``sample_steps``
    ODE steps) from an initial noise keyed by (seed, iteration, row): a fresh draw of the reference's
    distribution instead of the paper's fixed pool (the same expectation; no pool to store). The data image and
    its negative share one (t, eps) draw (each term's expectation is unchanged). The paper's self-play rounds
    (reference <- policy, negatives regenerated) are not run: the reference stays the initial model.
    ``beta`` scales d: with per-element mean errors it plays the role of Diffusion-DPO's beta / 2; the paper's
    values are for pixel-space EDM models and are not carried over.
    """

    name: str = "ddo"
    lr: float = 1e-5
    beta: float = 2500.0
    alpha: float = 1.0
    sample_steps: int = 20
    sample_guidance: float = 1.0  # CFG of the reference's samples: 1 the paper's guidance-free model
    time_sampling: str = "logit_normal"
    prompt_dropout: float = 0.0

    batch_kind: ClassVar[str] = "captions"
    _diag_keys: ClassVar[tuple] = ("policy_loss", "disc_acc", "d_data", "d_ref_samples")

    def __post_init__(self):
        super().__post_init__()
        if self.alpha <= 0 or self.beta <= 0:
            raise ConfigError(f"algorithm.alpha and algorithm.beta must be > 0, got {self.alpha} and {self.beta}")

    def augment(self, ctx, schedule, batch):
        (samples,) = self._sample_rows(ctx, batch, reference=True, record=False)
        return replace(batch, latents=torch.stack([batch.latents[:, 0], samples.to(batch.latents.dtype).cpu()],
                                                  dim=1))

    def row_losses(self, batch, rows, e_th, e_ref, extra):
        return ddo_loss(-(e_th[:, 0] - e_ref[:, 0]), -(e_th[:, 1] - e_ref[:, 1]), self.alpha, self.beta)


# ------------------------------------------------------------------------------------------------ online
@dataclass
class _OnlineFinal(_LossGuided, Stateless):
    """Shared by the online methods that train on the rollouts' final latents with fresh (time, noise) draws.

    Draws are keyed by (seed, iteration, prompt id): the images of one prompt's group share them, wherever the
    group's images landed (each prompt appears in one group per iteration)."""

    name: str = "online"
    group_size: int = 8
    lr: float = 3e-4
    beta: float = 100.0
    time_sampling: str = "logit_normal"
    draws_per_sample: int = 1
    loss_guidance: float = 1.0
    loss_guidance_trains: str = "both"
    rollouts_from: str = "policy"  # or reference: the frozen initial model draws them (flow_grpo's ref_update_step 1e7)

    batch_kind: ClassVar[str] = "final_latents"
    _diag_keys: ClassVar[tuple] = ("policy_loss",)
    supports_sharding = True  # train_step balances its passes over processes (distributed=fsdp)

    def __post_init__(self):
        _check_settings(self.lr, self.time_sampling, self.draws_per_sample, "draws_per_sample", self.loss_guidance,
                        self.loss_guidance_trains)
        if self.rollouts_from not in ("policy", "reference"):
            raise ConfigError(f"algorithm.rollouts_from='{self.rollouts_from}' is not known; use policy (the live "
                              f"weights draw the rollouts) or reference (the frozen initial model)")

    @property
    def rollout_weights(self) -> str:
        return "reference" if self.rollouts_from == "reference" else "live"

    def _draws(self, ctx, batch, shape):
        from alignrl.sampling.engine import sample_generators

        prompt_ids = [int(p) for p in batch.prompt_ids[batch.leaf_root.numpy()]]
        idx = torch.empty((len(prompt_ids), self.draws_per_sample), dtype=torch.long)
        eps = torch.empty((len(prompt_ids), self.draws_per_sample, *shape))
        for i, g in enumerate(sample_generators(ctx.seed * 17 + 3, ctx.iteration, prompt_ids)):
            idx[i], eps[i] = draw_time_and_noise(g, self.draws_per_sample, shape, self.time_sampling)
        return idx, eps


@dataclass
class OnlineDPO(_OnlineFinal):
    """DPO on the rollouts: each prompt's best and worst image of the group (by the reward, over all ranks; a
    tied group gives no pair) with one (t, eps) per pair, against the frozen initial model (Flow-DPO's online
    form). A pair's images may sit on different ranks: their errors are summed into a per-prompt table over all
    ranks (no gradient), which gives each image its loss coefficient; the gradient pass then weights each image's
    error by it. That costs one extra forward per image and uses the errors before the iteration's first
    optimizer step (exact with updates_per_iteration 1, the reference's single accumulated update)."""

    name: str = "online_dpo"

    _diag_keys: ClassVar[tuple] = ("policy_loss", "implicit_acc")

    @property
    def needs_reference(self) -> bool:
        return True

    def advantages(self, rewards, keys, per_reward=None, weights=None) -> AdvantageResult:
        rewards = np.asarray(rewards, dtype=np.float64)
        adv = np.zeros(len(rewards))
        keep = np.zeros(len(rewards), dtype=bool)
        varied, tied_frac = varied_groups(rewards, keys, np.isfinite(rewards))
        for members in varied:
            order = members[np.argsort(-rewards[members], kind="stable")]
            adv[order[0]], adv[order[-1]] = 1.0, -1.0
            keep[order[0]] = keep[order[-1]] = True
        return AdvantageResult(adv, keep, {"tied_group_frac": tied_frac,
                                           "kept_frac": float(keep.mean()) if len(keep) else 0.0})

    def train_step(self, batch, adv, ctx) -> dict:
        if not batch.plan.is_linear or adv.leaf is None:
            raise ConfigError(f"algorithm '{self.name}' trains on final images: use a linear sampler plan")
        schedule = ctx.backbone.make_schedule(1000)
        x0 = batch.leaf_x0.float()
        idx, eps = self._draws(ctx, batch, tuple(x0.shape[1:]))
        eps = eps.to(ctx.device)
        mine = np.nonzero(adv.leaf_keep)[0]
        prompt_ids = batch.prompt_ids[batch.leaf_root.numpy()]
        n_prompts = int(ctx.all_reduce_sum(torch.tensor([float(prompt_ids.max(initial=0) + 1)],
                                                        device=ctx.device)).item())  # a bound on the ids
        # (prompt, winner/loser, draw, [e_th, e_ref, scored]) over all ranks, before any update
        table = torch.zeros((n_prompts, 2, self.draws_per_sample, 3), dtype=torch.float64, device=ctx.device)
        ctx.denoiser.eval()
        shape = tuple(x0.shape[1:])
        scoring = [(mb, d) for mb in torch.as_tensor(mine, dtype=torch.long).split(ctx.train_batch_size) if len(mb)
                   for d in range(self.draws_per_sample)]
        with torch.no_grad():
            for (mb, d), real in balanced_passes(scoring, ctx, (None, 0)):
                if not real:  # distributed=fsdp: the gathers of a pass another process runs
                    padding_errors(ctx, schedule, shape, True, self.guided_loss)
                    continue
                prompts = [batch.prompts[int(batch.leaf_root[i])] for i in mb]
                e_th, e_ref = denoising_errors(ctx, schedule, x0[mb].to(ctx.device), prompts, idx[mb, d],
                                               eps[mb.to(ctx.device), d], True, self.guided_loss)
                for j, i in enumerate(mb.tolist()):
                    slot = 0 if adv.leaf[i] > 0 else 1
                    table[int(prompt_ids[i]), slot, d] = torch.stack([e_th[j], e_ref[j],
                                                                      torch.ones_like(e_th[j])]).double()
        table = ctx.all_reduce_sum(table)
        paired = (table[:, 0, 0, 2] > 0) & (table[:, 1, 0, 2] > 0)  # both images of the pair were scored
        d_w = table[:, 0, :, 0] - table[:, 0, :, 1]
        d_l = table[:, 1, :, 0] - table[:, 1, :, 1]
        inside = -(self.beta / 2) * (d_w - d_l)  # (prompts, draws)
        coef = (self.beta / 2) * torch.sigmoid(-inside)  # dL/de_th(w); the loser's is its negative
        pairs = int(paired.sum())
        loss_sum = float(F.softplus(-inside)[paired].sum())
        acc_sum = float(((inside > 0).double() + 0.5 * (inside == 0).double())[paired].sum())
        ctx.denoiser.train()
        total = max(pairs * self.draws_per_sample, 1)
        grad_norms = []
        for epoch in range(ctx.inner_epochs):
            for chunk in ctx.update_chunks(batch.global_index, epoch):
                rows = [i for i in chunk.tolist() if adv.leaf_keep[i]]
                if int(ctx.all_reduce_sum(torch.tensor([float(len(rows))], device=ctx.device)).item()) == 0:
                    continue
                passes = [(mb, d) for mb in torch.as_tensor(rows, dtype=torch.long).split(ctx.train_batch_size)
                          if len(mb) for d in range(self.draws_per_sample)]
                for (mb, d), real in balanced_passes(passes, ctx, (None, 0)):
                    if not real:  # distributed=fsdp: another process has more images; no gradient
                        ctx.backward(padding_errors(ctx, schedule, shape, False, self.guided_loss).sum() * 0.0)
                        continue
                    prompts = [batch.prompts[int(batch.leaf_root[i])] for i in mb]
                    sign = torch.tensor([1.0 if adv.leaf[i] > 0 else -1.0 for i in mb.tolist()], device=ctx.device)
                    ok = paired[torch.as_tensor(prompt_ids[mb.numpy()], device=ctx.device)].float()
                    e_th, _ = denoising_errors(ctx, schedule, x0[mb].to(ctx.device), prompts, idx[mb, d],
                                               eps[mb.to(ctx.device), d], False, self.guided_loss)
                    c = coef[torch.as_tensor(prompt_ids[mb.numpy()], device=ctx.device), d].float()
                    ctx.backward((sign * c * ok * e_th).sum() / total)
                grad_norms.append(ctx.optimizer_step())
        # the pair sums are global already (from the reduced table): rank 0 reports them, the others nothing
        first = ctx.rank == 0
        return ctx.summarise({"policy_loss": loss_sum if first else 0.0, "implicit_acc": acc_sum if first else 0.0},
                             pairs * self.draws_per_sample if first else 0, 0.0, grad_norms)


@dataclass
class FlowRWR(_OnlineFinal):
    """Reward-weighted regression on the rollouts: the flow-matching loss of each image weighted by
    ``exp(r / beta)`` normalised to mean 1 over the iteration's images on all ranks (``normalise: batch``,
    ``rwr_weights``) or within each prompt's group (``normalise: group``: a group whose rewards all tie is
    dropped, so easy prompts do not dominate the update). ``beta`` is the temperature (small: close to training on
    the best images only). ``anchor`` > 0 adds ``anchor * |v_th - v_ref|^2`` at the same noised point against the
    frozen initial model (the Wasserstein-2 regulariser of online reward-weighted flow matching, ORW-CFM-W2), which
    keeps the policy from drifting off on its own samples; 0 (the default): no reference, the plain objective."""

    name: str = "flow_rwr"
    beta: float = 1.0
    normalise: str = "batch"
    anchor: float = 0.0

    _diag_keys: ClassVar[tuple] = ("policy_loss", "weight_max", "anchor_gap")

    def __post_init__(self):
        super().__post_init__()
        if self.normalise not in ("batch", "group"):
            raise ConfigError(f"algorithm.normalise='{self.normalise}' is not known; use batch or group")
        _check_anchor(self.anchor)

    @property
    def needs_reference(self) -> bool:
        return self.anchor > 0 or self.rollouts_from == "reference"

    def advantages(self, rewards, keys, per_reward=None, weights=None) -> AdvantageResult:
        rewards = np.asarray(rewards, dtype=np.float64)
        ok = np.isfinite(rewards)
        w = np.zeros(len(rewards))
        tied_frac = 0.0
        if self.normalise == "batch":
            if ok.any():
                w[ok] = rwr_weights(torch.as_tensor(rewards[ok]), self.beta).numpy()
        else:  # per prompt group: mean 1 within a group; a group whose rewards all tie carries no preference
            varied, tied_frac = varied_groups(rewards, keys, ok)
            ok = np.zeros(len(rewards), dtype=bool)
            for members in varied:
                w[members] = rwr_weights(torch.as_tensor(rewards[members]), self.beta).numpy()
                ok[members] = True
        return AdvantageResult(w, ok, {"weight_max": float(w.max(initial=0.0)), "kept_frac": float(ok.mean()),
                                       "tied_group_frac": float(tied_frac)})

    def train_step(self, batch, adv, ctx) -> dict:
        if not batch.plan.is_linear or adv.leaf is None:
            raise ConfigError(f"algorithm '{self.name}' trains on final images: use a linear sampler plan")
        schedule = ctx.backbone.make_schedule(1000)
        x0 = batch.leaf_x0.float()
        idx, eps = self._draws(ctx, batch, tuple(x0.shape[1:]))
        eps = eps.to(ctx.device)
        w_all = torch.as_tensor(adv.leaf, dtype=torch.float32, device=ctx.device)
        ctx.denoiser.train()
        sums = {"policy_loss": 0.0, "weight_max": 0.0, "anchor_gap": 0.0}
        anchored = self.anchor > 0
        count, grad_norms = 0, []
        for epoch in range(ctx.inner_epochs):
            for chunk in ctx.update_chunks(batch.global_index, epoch):
                rows = torch.as_tensor([i for i in chunk.tolist() if adv.leaf_keep[i]], dtype=torch.long)
                total = float(ctx.all_reduce_sum(torch.tensor([float(len(rows) * self.draws_per_sample)],
                                                              device=ctx.device)).item())
                if total == 0:
                    continue
                passes = [(mb, d) for mb in rows.split(ctx.train_batch_size) if len(mb)
                          for d in range(self.draws_per_sample)]
                for (mb, d), real in balanced_passes(passes, ctx, (None, 0)):
                    if not real:  # distributed=fsdp: another process has more images; no gradient
                        ctx.backward(padding_errors(ctx, schedule, tuple(x0.shape[1:]), anchored, self.guided_loss).sum() * 0.0)
                        continue
                    prompts = [batch.prompts[int(batch.leaf_root[i])] for i in mb]
                    e_th, gap = denoising_errors(ctx, schedule, x0[mb].to(ctx.device), prompts, idx[mb, d],
                                                 eps[mb.to(ctx.device), d], anchored, self.guided_loss, gap=True)
                    loss = w_all[mb.to(ctx.device)] * e_th
                    ctx.backward((loss.sum() + self.anchor * gap.sum() if anchored else loss.sum()) / total)
                    sums["policy_loss"] += float(loss.detach().sum())
                    if anchored:
                        sums["anchor_gap"] += float(gap.detach().sum())
                    sums["weight_max"] += float(w_all[mb.to(ctx.device)].max()) * len(mb)
                    count += len(mb)
                grad_norms.append(ctx.optimizer_step())
        return ctx.summarise(sums, count, 0.0, grad_norms)
