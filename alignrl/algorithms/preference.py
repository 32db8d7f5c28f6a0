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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignrl.errors import ConfigError

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
        diag = {"implicit_acc": ((2 * y - 1) * (g - z) > 0).float(), "reward_margin": g.detach()}
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


LOG2 = math.log(2.0)
