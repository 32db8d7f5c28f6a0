"""ShapeWorld's exact judge as a reward: the fraction of satisfied sub-conditions (partial credit, the
training reward, as Flow-GRPO's GenEval reward), with the strict 0/1 score per sample alongside."""

from __future__ import annotations

import numpy as np

from alignrl.rewards.base import Reward, register_reward
from alignrl.rewards.jpeg import to_uint8


@register_reward("shapes_geneval")
class ShapesGenEval(Reward):
    per_sample_keys = ("strict", "partial")

    def __init__(self, score: str = "partial"):
        if score not in ("partial", "strict"):
            raise ValueError(f"score must be partial or strict, got {score!r}")
        self.score = score

    def __call__(self, images, prompts, metadata):
        from alignrl.shapes.judge import check

        for m, p in zip(metadata, prompts):
            if "objects" not in m:
                raise ValueError(f"prompt {p!r} has no ShapeWorld metadata (use data=shapes prompt sets)")
        results = [check(img, m) for img, m in zip(to_uint8(images), metadata)]
        strict = np.array([r["strict"] for r in results])
        partial = np.array([r["partial"] for r in results])
        return (partial if self.score == "partial" else strict), {
            "strict": float(strict.mean()), "partial": float(partial.mean()),
            "per_sample": {"strict": strict, "partial": partial},
        }


# typical object area by shape: sides 7-11 px (mean of s^2: 83 px), a disk pi/4 of its box, a triangle half
SOFT_AREA = {"square": 83.0, "circle": 65.0, "triangle": 41.5}


@register_reward("shapes_soft")
class ShapesSoft(Reward):
    """A differentiable surrogate of the ShapeWorld judge (for the reward-gradient methods): the judge's
    sub-conditions with soft colour masks in place of hard ones, and no shape classifier.

    A pixel's membership of colour c is ``prod_channel sigmoid((TOL - |x - c|) / tau)`` (0-255 units; the
    judge's hard test is ``|x - c| <= TOL`` on every channel); an uncoloured clause takes the strongest colour.
    Per clause: present = ``sigmoid((area - MIN_AREA) / 3)``; a count N is ``exp(-(area / A_shape - N)^2 / 0.5)``
    with A_shape the renderer's typical object area; a relation compares the clauses' soft-mask centroids,
    ``sigmoid((gap - margin) / 1 px)``. The score is the mean of the conditions, as the judge's partial credit.
    Shape identity is not scored (a circle drawn for a square passes here): the surrogate's blind spot, which the
    exact judge (logged beside it) does see."""

    differentiable = True
    per_sample_keys = ()

    def __init__(self, tau: float = 10.0):
        self.tau = float(tau)

    def _mask_fns(self, images):
        """Per image, a function from a prompt clause to its (H, W) soft mask: here each pixel's soft membership
        of the clause's colour (of an uncoloured clause: the strongest colour, whatever the shape)."""
        import torch

        from alignrl.shapes.judge import COLOR_TOL
        from alignrl.shapes.world import COLORS

        x = images.float() * 255.0  # (B, 3, H, W)
        rgb = torch.tensor(list(COLORS.values()), dtype=x.dtype, device=x.device).view(1, -1, 3, 1, 1)
        masks = torch.sigmoid((COLOR_TOL - (x[:, None] - rgb).abs()) / self.tau).prod(dim=2)  # (B, colours, H, W)
        names = {name: i for i, name in enumerate(COLORS)}
        return [lambda clause, m=m: m[names[clause["color"]]] if clause["color"] else m.max(dim=0).values
                for m in masks]

    def _conditions(self, mask_of, image, meta):
        import torch

        from alignrl.shapes.judge import MIN_AREA, REL_MARGIN

        conds, centroids = [], []
        h, w = image.shape[-2:]
        ys = torch.arange(h, dtype=torch.float32, device=image.device).view(h, 1)
        xs = torch.arange(w, dtype=torch.float32, device=image.device).view(1, w)
        for clause in meta["objects"]:
            m = mask_of(clause)
            area = m.sum()
            conds.append(torch.sigmoid((area - MIN_AREA) / 3.0))
            if clause.get("count"):
                conds.append(torch.exp(-((area / SOFT_AREA[clause["shape"]] - clause["count"]) ** 2) / 0.5))
            total = area.clamp(min=1e-6)
            centroids.append(((m * xs).sum() / total, (m * ys).sum() / total))
        rel = meta.get("relation")
        if rel:
            (ax, ay), (bx, by) = centroids[rel["a"]], centroids[rel["b"]]
            gap = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel["type"]]
            conds.append(torch.sigmoid(gap - REL_MARGIN))
        return torch.stack(conds)

    def score_tensor(self, images, prompts, metadata=None):
        import torch

        metadata = list(metadata or [])
        if len(metadata) != images.shape[0] or any("objects" not in m for m in metadata):
            raise ValueError(f"{self.reward_name} needs ShapeWorld metadata for every image (use data=shapes prompt sets)")
        return torch.stack([self._conditions(mask_of, img, m).mean()
                            for mask_of, img, m in zip(self._mask_fns(images), images, metadata)])

    def __call__(self, images, prompts, metadata):
        import torch

        with torch.no_grad():
            scores = self.score_tensor(images, prompts, metadata)
        return scores.cpu().double().numpy(), {}


@register_reward("shapes_seg")
class ShapesSeg(ShapesSoft):
    """The judge's differentiable surrogate that sees shapes: ``shapes_soft``'s sub-conditions (presence by area,
    counts by area over the shape's typical area, relations by soft centroids), with each clause's mask read from
    the segmenter distilled from the judge (:mod:`alignrl.shapes.segmenter`): the probability that a pixel belongs
    to an object of the clause's colour and shape (summed over colours for an uncoloured clause), sharpened by
    ``sigmoid(sharpness (p - 1/2))`` so that a faint probability spread over the background does not add up to an
    object. ``segmenter``: a folder with other weights (default: the package's)."""

    def __init__(self, segmenter: str | None = None, sharpness: float = 12.0, model=None):
        self.folder = segmenter
        self.sharpness = float(sharpness)
        self._model = model

    @property
    def model(self):
        if self._model is None:
            from alignrl.shapes import segmenter

            self._model = segmenter.load(self.folder)
        return self._model

    def _mask_fns(self, images):
        import torch

        from alignrl.shapes.world import COLORS, SHAPES

        probs = self.model.to(images.device)(images.float()).softmax(dim=1)  # (B, 13, H, W): one pass
        sharp = torch.sigmoid(self.sharpness * (probs[:, 1:] - 0.5))  # judge.CLASSES order: colour-major
        sharp = sharp.unflatten(1, (len(COLORS), len(SHAPES)))  # (B, colours, shapes, H, W)
        c, s = {name: i for i, name in enumerate(COLORS)}, {name: i for i, name in enumerate(SHAPES)}
        return [lambda clause, m=m: m[c[clause["color"]], s[clause["shape"]]] if clause["color"]
                else m[:, s[clause["shape"]]].sum(dim=0) for m in sharp]
