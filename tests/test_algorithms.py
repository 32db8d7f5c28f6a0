"""Algorithms behind their protocol, tested with hand-made batches and a plain context: no Trainer, no model.

The denoiser is one scalar weight (v = w * x); the context's services are plain functions over a torch
optimizer, as the loop would provide them on one rank.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignrl.algorithms.advantages import AdvantageResult, batch_advantages
from alignrl.algorithms.base import BATCH_KINDS, Advantages, Algorithm, RolloutBatch, StepContext
from alignrl.backbones.base import Backbone, Schedule
from alignrl.components import ALGORITHMS, build_algorithm
from alignrl.locate import locate
from alignrl.sampling.engine import apply_step
from alignrl.sampling.parameterisation import FLOW
from alignrl.sampling.plans import StepSpec


class ScalarDenoiser(torch.nn.Module):
    def __init__(self, w: float = 0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))


class FakeBackbone:
    """Velocity v = w * x on a linear sigma grid; conditioning is ignored."""

    parameterisation = FLOW
    prediction_type = "flow"
    # the protocol's flow-frame conversions and objective weight (identities for flow models)
    to_frame, from_frame, objective_weight = Backbone.to_frame, Backbone.from_frame, Backbone.objective_weight
    uses_cfg, cfg_active = False, Backbone.cfg_active  # no guidance: predict ignores the conditioning

    def __init__(self, w: float = 0.5):
        self.denoiser = ScalarDenoiser(w)

    def make_schedule(self, num_steps: int) -> Schedule:
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
        return Schedule(sigmas, sigmas[:-1] * 1000)

    text_trainable = False
    cache = None
    prompt_table = Backbone.prompt_table

    def encode_prompts(self, prompts):
        from alignrl.backbones.base import Conditioning

        return Conditioning({"row": torch.arange(len(prompts), dtype=torch.float32)[:, None]})

    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        return (transformer or self.denoiser).w * x


def make_context(backbone, *, updates=1, epochs=1, lr=0.1, reference_w=None, reduce_factor=1.0):
    params = list(backbone.denoiser.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    steps = []

    def optimizer_step():
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1e9))
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(norm)
        return norm

    def chunks(global_index, epoch):
        return [torch.as_tensor(c, dtype=torch.long) for c in np.array_split(np.arange(len(global_index)), updates)]

    ref = ScalarDenoiser(reference_w) if reference_w is not None else None

    @torch.no_grad()
    def predict_reference(x, t, cond, g):
        return backbone.predict(x, t, cond, g, transformer=ref)

    def summarise(sums, count, ratio_dev, grad_norms):
        out = {k: v / max(count, 1) for k, v in sums.items()}
        return {**out, "ratio_dev_before_update": ratio_dev, "optimizer_steps": len(steps), "grad_norms": grad_norms}

    ctx = StepContext(
        backbone=backbone, denoiser=backbone.denoiser, device=torch.device("cpu"), seed=0, iteration=0,
        train_batch_size=4, updates_per_iteration=updates, inner_epochs=epochs, autocast=nullcontext,
        backward=lambda loss: loss.backward(), optimizer_step=optimizer_step,
        all_reduce_sum=lambda t: t * reduce_factor, update_chunks=chunks, predict_reference=predict_reference,
        old_policy_weights=nullcontext, summarise=summarise,
    )
    return ctx, steps


def transitions_batch(backbone, n=2, steps=3, trained=(0, 1), seed=0):
    """Linear SDE rollouts of ``n`` roots under ``backbone``, recording the ``trained`` steps."""
    g = torch.Generator().manual_seed(seed)
    schedule = backbone.make_schedule(steps)
    spec = StepSpec(kind="sde", noise_level=0.7, trained=True)
    x = torch.randn(n, 2, 4, 4, generator=g)
    cols = {k: [] for k in ("x", "next_x", "logp_old", "mean_old", "t_from", "t_root")}
    with torch.no_grad():
        for j in range(steps):
            v = backbone.predict(x, schedule.timesteps[j], None, 1.0)
            noise = torch.randn(x.shape, generator=g)
            out = apply_step(backbone, spec, schedule, j, x, v, noise=noise)
            if j in trained:
                cols["x"].append(x)
                cols["next_x"].append(out.next_x)
                cols["logp_old"].append(out.logp_mean_per_dim)
                cols["mean_old"].append(out.mean)
                cols["t_from"].append(torch.full((n,), j))
                cols["t_root"].append(torch.arange(n))
            x = out.next_x
    cat = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in cols.items()}
    t_from = cat["t_from"]
    m = len(t_from)
    plan = SimpleNamespace(base_steps=steps, guidance_scale=1.0, is_linear=True)
    return RolloutBatch(
        prompts=[f"p{i}" for i in range(n)], prompt_ids=np.zeros(n, dtype=np.int64), global_index=np.arange(n),
        plan=plan, leaf_root=torch.arange(n), leaves_per_root=1, leaf_x0=x.clone(), leaf_path_logp=None,
        leaf_tag=None, x=cat["x"], next_x=cat["next_x"], logp_old=cat["logp_old"], mean_old=cat["mean_old"],
        t_from=t_from, t_to=t_from + 1, t_spec=[spec] * m, t_root=cat["t_root"], t_leaf_lo=cat["t_root"], t_leaf_count=torch.ones(m, dtype=torch.long),
        t_key=torch.zeros(m, dtype=torch.long), t_weight=torch.ones(m),
    )


def leaf_advantages(batch, values, keep=None):
    values = np.asarray(values, dtype=np.float64)
    keep = np.ones(len(values), dtype=bool) if keep is None else np.asarray(keep)
    t_leaf = batch.t_leaf_lo.numpy()
    return Advantages(values, keep, values[t_leaf], keep[t_leaf], {})


def logp_now(backbone, batch):
    schedule = backbone.make_schedule(batch.plan.base_steps)
    with torch.no_grad():
        out = []
        for i in range(len(batch.t_from)):
            j = int(batch.t_from[i])
            x = batch.x[i:i + 1]
            v = backbone.predict(x, schedule.timesteps[j], None, 1.0)
            out.append(apply_step(backbone, batch.t_spec[i], schedule, j, x, v, next_x=batch.next_x[i:i + 1],
                                  i_to=j + 1).logp_mean_per_dim)
    return torch.cat(out)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_registered_algorithm_implements_the_protocol(name):
    algo = locate(ALGORITHMS[name])(name=name, group_size=4)
    assert isinstance(algo, Algorithm)
    assert algo.batch_kind in BATCH_KINDS
    assert algo.rollout_weights in ("live", "ema")


def test_flowgrpo_step_starts_on_policy_and_ascends_the_advantage_weighted_log_prob():
    from alignrl.algorithms.flowgrpo import FlowGRPO

    backbone = FakeBackbone()
    batch = transitions_batch(backbone)
    algo = FlowGRPO(group_size=2, clip_range=10.0, beta=0.0)
    before = logp_now(backbone, batch)
    ctx, steps = make_context(backbone, updates=2, epochs=2, lr=0.05)
    out = algo.train_step(batch, leaf_advantages(batch, [1.0, -1.0]), ctx)
    assert out["ratio_dev_before_update"] == 0.0  # the rollout's own weights: every ratio is exactly 1
    assert len(steps) == 4  # updates per iteration x inner epochs optimizer steps
    gain = logp_now(backbone, batch) - before
    adv = torch.tensor([1.0, -1.0])[batch.t_root]
    assert float((adv * gain).sum()) > 0  # ascent on the surrogate sum A * log p (one shared weight)


def test_transition_loss_is_normalised_by_the_global_weight():
    """Another rank with the same weight total halves this rank's gradient (the all-reduced sum divides)."""
    from alignrl.algorithms.flowgrpo import FlowGRPO

    grads = []
    for factor in (1.0, 2.0):
        backbone = FakeBackbone()
        batch = transitions_batch(backbone)
        ctx, steps = make_context(backbone, reduce_factor=factor)
        FlowGRPO(group_size=2, clip_range=10.0, beta=0.0).train_step(batch, leaf_advantages(batch, [1.0, -0.5]), ctx)
        grads.append(steps[0])
    assert grads[1] == pytest.approx(grads[0] / 2, rel=1e-6)


def test_dropped_samples_do_not_train_and_an_all_dropped_chunk_skips_its_step():
    from alignrl.algorithms.flowgrpo import FlowGRPO

    backbone = FakeBackbone()
    batch = transitions_batch(backbone)
    ctx, steps = make_context(backbone, updates=2)  # chunk 0 holds root 0, chunk 1 root 1
    w0 = backbone.denoiser.w.item()
    FlowGRPO(group_size=2, beta=0.0).train_step(batch, leaf_advantages(batch, [0.0, 0.0], keep=[False, False]), ctx)
    assert steps == [] and backbone.denoiser.w.item() == w0
    FlowGRPO(group_size=2, beta=0.0).train_step(batch, leaf_advantages(batch, [1.0, 0.0], keep=[True, False]), ctx)
    assert len(steps) == 1  # only the chunk with a kept sample steps


def test_kl_term_uses_the_reference_and_is_zero_at_it():
    from alignrl.algorithms.flowgrpo import FlowGRPO

    backbone = FakeBackbone(0.5)
    batch = transitions_batch(backbone)
    algo = FlowGRPO(group_size=2, beta=0.5)
    ctx, _ = make_context(backbone, reference_w=0.5)
    assert algo.train_step(batch, leaf_advantages(batch, [1.0, -1.0]), ctx)["kl"] == 0.0  # first step: policy == ref
    ctx, _ = make_context(FakeBackbone(0.5), reference_w=0.0)
    backbone2 = ctx.backbone
    assert algo.train_step(transitions_batch(backbone2), leaf_advantages(batch, [1.0, -1.0]), ctx)["kl"] > 0


def test_awm_step_lowers_the_matching_error_of_good_samples_and_raises_it_for_bad_ones():
    from alignrl.algorithms.matching import AWM

    def mse_after(adv: float) -> tuple[float, float]:
        backbone = FakeBackbone(0.2)
        batch = transitions_batch(backbone, n=1, trained=())
        algo = AWM(group_size=1, num_train_timesteps=2, adv_clip_max=1.0)
        schedule = backbone.make_schedule(batch.plan.base_steps)
        torch.manual_seed(0)
        x0, eps = batch.leaf_x0, torch.randn_like(batch.leaf_x0)
        sig = schedule.sigmas[1]
        x_t = (1 - sig) * x0 + sig * eps

        def mse():
            with torch.no_grad():
                return float(((backbone.predict(x_t, None, None, 1.0) - (eps - x0)) ** 2).mean())

        before = mse()
        ctx, steps = make_context(backbone, lr=0.05)
        out = algo.train_step(batch, Advantages(np.array([adv]), np.array([True]), np.zeros(0), np.zeros(0, bool), {}),
                              ctx)
        assert len(steps) == 1 and out["matching_mse"] > 0
        return before, mse()

    before, after = mse_after(1.0)
    assert after < before
    before, after = mse_after(-1.0)
    assert after > before


def test_matching_methods_refuse_trees():
    from alignrl.algorithms.matching import DiffusionNFT
    from alignrl.errors import ConfigError

    backbone = FakeBackbone()
    batch = transitions_batch(backbone)
    batch.plan.is_linear = False
    ctx, _ = make_context(backbone)
    with pytest.raises(ConfigError, match="linear sampler plan"):
        DiffusionNFT(group_size=2).train_step(batch, Advantages(None, None, np.zeros(0), np.zeros(0, bool), {}), ctx)


def tree_batch(rewards):
    """Two roots of a depth-2 binary tree over 3 steps (4 leaves each): steps 0-1 train the two depth-1 edges of
    each root (child node = leaves lo..lo+1), step 2 trains the leaf edges."""
    rows = []  # (root, step, leaf_lo, leaf_count, key)
    for root in range(2):
        base = 4 * root
        for step in (0, 1):
            rows += [(root, step, base, 2, 1), (root, step, base + 2, 2, 1)]
        rows += [(root, 2, base + k, 1, 2) for k in range(4)]
    arr = np.array(rows)
    m = len(arr)
    plan = SimpleNamespace(is_linear=False, side_branches=(), fusion="mean", fusion_alpha=1.0, width_prune_ratio=0.0)
    z = torch.zeros(m, 1)
    return RolloutBatch(
        prompts=["a", "b"], prompt_ids=np.array([0, 1]), global_index=np.array([0, 1]), plan=plan,
        leaf_root=torch.tensor([0] * 4 + [1] * 4), leaves_per_root=4, leaf_x0=None,
        leaf_path_logp=torch.zeros(8), leaf_tag=torch.zeros(8, dtype=torch.long), x=z, next_x=z,
        logp_old=torch.zeros(m), mean_old=z, t_from=torch.as_tensor(arr[:, 1]), t_to=torch.as_tensor(arr[:, 1] + 1),
        t_spec=[None] * m, t_root=torch.as_tensor(arr[:, 0]), t_leaf_lo=torch.as_tensor(arr[:, 2]),
        t_leaf_count=torch.as_tensor(arr[:, 3]), t_key=torch.as_tensor(arr[:, 4]), t_weight=torch.ones(m),
        rewards=np.asarray(rewards, dtype=np.float64),
    )


def plain_normaliser(values, keys, ids, per_reward):
    """One rank's group normalisation (population std, no eps): what the loop's gather reduces to."""
    adv, keep = np.zeros(len(values)), np.zeros(len(values), dtype=bool)
    for k in np.unique(keys):
        m = keys == k
        std = values[m].std()
        if std > 0:
            adv[m], keep[m] = (values[m] - values[m].mean()) / std, True
    return AdvantageResult(adv, keep, {})


def test_tree_advantages_from_plain_arrays():
    batch = tree_batch([1.0, 2.0, 3.0, 5.0, 0.0, 0.0, 4.0, 4.0])
    adv = batch_advantages(batch, plain_normaliser)
    got = {(int(r), int(s), int(lo)): a for r, s, lo, a in
           zip(batch.t_root, batch.t_from, batch.t_leaf_lo, adv.transition)}
    # root 0: depth-1 nodes fuse {1, 2} -> 1.5 and {3, 5} -> 4: normalised -1, +1 at both steps
    assert got[(0, 0, 0)] == pytest.approx(-1) and got[(0, 1, 2)] == pytest.approx(1)
    leaf_std = np.std([1.0, 2.0, 3.0, 5.0])
    for k, r in enumerate([1.0, 2.0, 3.0, 5.0]):
        assert got[(0, 2, k)] == pytest.approx((r - 2.75) / leaf_std)
    # root 1: {0, 0} -> 0 and {4, 4} -> 4: -1, +1; the leaves 0, 0, 4, 4 -> -1, -1, +1, +1
    assert got[(1, 0, 4)] == pytest.approx(-1) and got[(1, 0, 6)] == pytest.approx(1)
    assert [got[(1, 2, 4 + k)] for k in range(4)] == pytest.approx([-1, -1, 1, 1])
    assert adv.leaf is None and adv.stats["nodes"] == 12
    assert adv.transition_keep.all()


def test_tree_fusion_by_log_prob_softmax_weights_leaves():
    batch = tree_batch([0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    batch.plan.fusion = "logp_softmax"
    batch.leaf_path_logp = torch.tensor([0.0, np.log(3.0)] * 4)  # leaf 1 of each pair 3x as likely
    seen = {}

    def spy(values, keys, ids, per_reward):
        seen[tuple(keys.tolist())] = values
        return plain_normaliser(values, keys, ids, per_reward)

    batch_advantages(batch, spy)
    values = np.concatenate(list(seen.values()))
    assert 0.75 in np.round(values, 6)  # node {0, 1} of rewards (0, 1) weighted (1/4, 3/4)


@pytest.mark.parametrize("adv, r", [(1.0, 1.0), (-1.0, 0.0), (0.5, 0.75)])
def test_nft_logs_its_positive_weight(adv, r):
    """r = clamp(clip(A) / adv_clip_max / 2 + 1/2, 0, 1), logged as positive_weight (a diagnostic of its own)."""
    from alignrl.algorithms.matching import DiffusionNFT

    backbone = FakeBackbone(0.2)
    batch = transitions_batch(backbone, n=1, trained=())
    ctx, steps = make_context(backbone)
    algo = DiffusionNFT(group_size=1, num_train_timesteps=2, adv_clip_max=1.0, old_policy="sampling")
    out = algo.train_step(batch, Advantages(np.array([adv]), np.array([True]), np.zeros(0), np.zeros(0, bool), {}), ctx)
    assert out["positive_weight"] == pytest.approx(r) and np.isfinite(out["policy_loss"]) and len(steps) == 1


def test_nft_policy_loss_scale_multiplies_the_policy_term_only():
    """The reference scales NFT's policy loss by adv_clip_max (5) before adding the KL: policy_loss_scale."""
    from alignrl.algorithms.matching import DiffusionNFT

    g = torch.Generator().manual_seed(0)
    v, v_old, v_ref, x_t, x0, eps = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(6))
    t, adv = torch.tensor([0.3, 0.6, 0.9]), torch.tensor([1.0, -0.5, 0.2])
    one = DiffusionNFT(beta=0.5).matching_loss(v, v_old, v_ref, x_t, x0, eps, t, adv)
    five = DiffusionNFT(beta=0.5, policy_loss_scale=5.0).matching_loss(v, v_old, v_ref, x_t, x0, eps, t, adv)
    assert torch.allclose(five[1]["policy_loss"], 5 * one[1]["policy_loss"])
    assert torch.allclose(five[1]["kl"], one[1]["kl"])
    assert torch.allclose(five[0] - 0.5 * five[1]["kl"], 5 * (one[0] - 0.5 * one[1]["kl"]), atol=1e-5)


class ThirdPartyMethod:
    """A method defined outside alignrl (here: in a test module), reached only through its ``_target_``."""

    batch_kind = "transitions"
    needs_reference = False
    rollout_weights = "live"
    diagnostics = ("policy_loss",)

    def __init__(self, name="mine", group_size=4, lr=1e-3, scale=1.0):
        self.name, self.group_size, self.lr, self.scale = name, group_size, lr, scale

    def advantages(self, rewards, keys, per_reward=None, weights=None):
        return AdvantageResult(np.asarray(rewards) * self.scale, np.ones(len(rewards), bool), {})

    def train_step(self, batch, adv, ctx):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_an_algorithm_of_ones_own_is_built_from_its_target():
    from omegaconf import OmegaConf

    from alignrl.errors import ConfigError

    cfg = OmegaConf.create({"algorithm": {"_target_": f"{__name__}.ThirdPartyMethod", "name": "mine", "scale": 2.0}})
    algo = build_algorithm(cfg)
    assert isinstance(algo, ThirdPartyMethod) and algo.scale == 2.0 and isinstance(algo, Algorithm)
    cfg.algorithm._target_ = f"{__name__}.NoSuchClass"
    with pytest.raises(ConfigError, match="algorithm._target_=.*has no 'NoSuchClass'"):
        build_algorithm(cfg)
    cfg.algorithm._target_ = "no_such_package.Method"
    with pytest.raises(ConfigError, match="cannot import module 'no_such_package'"):
        build_algorithm(cfg)
    cfg.algorithm._target_ = f"{__name__}.FakeBackbone"  # not an algorithm
    cfg.algorithm.pop("scale")
    cfg.algorithm.pop("name")
    with pytest.raises(ConfigError, match="lacks .*algorithm protocol"):
        build_algorithm(cfg)


def _readme_block(first_line: str) -> str:
    """The fenced code block of README.md whose first line is ``first_line``."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", text, flags=re.S):
        if first_line in block.splitlines()[:2] or any(ln.startswith(first_line + " ") for ln in block.splitlines()[:2]):
            return block
    raise AssertionError(f"README.md has no code block starting with {first_line!r}")


def test_the_readme_walk_through_adds_a_method_outside_the_package(tmp_path, monkeypatch):
    """README "Add a method": the file, its YAML and a recipe in a config directory of one's own train as written."""
    import json

    from conftest import run_inprocess

    for rel in ("mypkg/rwr.py", "myconfigs/algorithm/rollout_rwr.yaml", "myconfigs/recipe/tiny_rollout_rwr.yaml"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_readme_block(f"# {rel}"), encoding="utf-8")
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {"ALIGNRL_CONFIG_PATH": str(tmp_path / "myconfigs")}
    listed = run_inprocess("recipes", env=env)
    assert "tiny_rollout_rwr" in listed.stdout and "rollout_rwr" in listed.stdout
    run = tmp_path / "run"
    proc = run_inprocess("train", "recipe=tiny_rollout_rwr", f"run_dir={run}", "trainer.max_steps=3",
                         "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_images_every=0",
                         "logger.progress_bar=false", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["policy_loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["optimizer_steps"] == 3
    assert (run / "config.yaml").read_text().count("mypkg.rwr.RolloutRWR") == 1
    # without the config directory the recipe is unknown, in one line
    proc = run_inprocess("train", "recipe=tiny_rollout_rwr", f"run_dir={tmp_path / 'other'}")
    assert proc.returncode != 0 and "unknown recipe 'tiny_rollout_rwr'" in proc.stderr


def test_layers_import_downward_only():
    """algorithms sit below training (the loop calls them, never the other way); sampling and backbones below
    both. A module of a lower layer importing a higher one fails here, naming the import."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "alignrl"
    forbidden = {
        "sampling": ("alignrl.algorithms", "alignrl.training", "alignrl.commands", "alignrl.cli", "alignrl.eval"),
        "algorithms": ("alignrl.training", "alignrl.commands", "alignrl.cli", "alignrl.eval", "alignrl.policy"),
        "backbones": ("alignrl.algorithms", "alignrl.training", "alignrl.commands", "alignrl.cli"),
    }
    bad = []
    for layer, banned in forbidden.items():
        for f in sorted((root / layer).glob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                bad += [f"{layer}/{f.name} imports {n}" for n in names if n.startswith(banned)]
    assert not bad, bad


def test_online_dpo_gradient_equals_the_pair_loss_gradient():
    """The two-pass step (errors summed into a per-prompt table, then coefficient-weighted errors) has the
    gradient of the DPO loss of each group's best and worst image computed directly."""
    from alignrl.algorithms.preference import OnlineDPO, dpo_loss

    backbone = FakeBackbone(0.4)
    batch = transitions_batch(backbone, n=6, trained=())
    batch.prompt_ids = np.array([0, 0, 0, 1, 1, 1])  # two groups of three
    batch.rewards = np.array([0.2, 0.9, 0.5, 0.3, 0.3, 0.1])  # group 0: 1 beats 0; group 1: 0 (first of the tie) beats 2
    algo = OnlineDPO(group_size=3, beta=20.0)
    res = algo.advantages(batch.rewards, batch.prompt_ids)
    assert res.advantages.tolist() == [-1, 1, 0, 1, 0, -1] and res.keep.tolist() == [1, 1, 0, 1, 0, 1]
    adv = Advantages(res.advantages, res.keep, np.zeros(0), np.zeros(0, bool), {})
    grads = []
    ctx, _ = make_context(backbone, reference_w=0.1, lr=0.0)
    inner_step = ctx.optimizer_step
    ctx.optimizer_step = lambda: (grads.append(backbone.denoiser.w.grad.clone()), inner_step())[1]
    out = algo.train_step(batch, adv, ctx)
    # the same loss written out: the pair's shared (t, eps), policy and reference errors
    schedule = backbone.make_schedule(1000)
    idx, eps = algo._draws(ctx, batch, tuple(batch.leaf_x0.shape[1:]))
    ref = ScalarDenoiser(0.1)
    w = backbone.denoiser.w
    losses = []
    for win, lose in ((1, 0), (3, 5)):
        def err(i, model):
            sig, ts = schedule.sigmas[idx[i, 0]], schedule.timesteps[idx[i, 0]]
            x0 = batch.leaf_x0[i:i + 1]
            x_t = FLOW.add_noise(x0, eps[i:i + 1, 0], sig)
            return ((model.w * x_t - FLOW.target(x0, eps[i:i + 1, 0], sig)) ** 2).mean().reshape(1)
        loss, _ = dpo_loss(err(win, backbone.denoiser), err(lose, backbone.denoiser), err(win, ref).detach(),
                           err(lose, ref).detach(), algo.beta)
        losses.append(loss)
    direct = torch.autograd.grad(torch.cat(losses).sum() / 2, w)[0]
    assert torch.allclose(grads[0], direct, rtol=1e-5), (grads[0], direct)
    assert out["policy_loss"] == pytest.approx(float(torch.cat(losses).detach().mean()), rel=1e-5)


def test_smpo_inversion_is_heun_on_the_coarse_grid_below_t_and_the_label_is_soft():
    """v = w x: each grid step of length h multiplies x by 1 + h w + (h w)^2 / 2 (Euler plus one ReNoise
    refinement); t = 0.5 on a 5-step grid stops at 0.4 (two steps). The loss is DPO's with the soft weight."""
    from alignrl.algorithms.preference import SmPO, dpo_loss, smpo_soft_weight

    backbone = FakeBackbone(0.3)
    ctx, _ = make_context(backbone)
    algo = SmPO(inversion_steps=5)
    schedule = backbone.make_schedule(1000)
    x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x_inv = algo._invert(ctx, schedule, x0, None, torch.tensor([0.5, 0.1]))
    factor = 1 + 0.2 * 0.3 + (0.2 * 0.3) ** 2 / 2
    torch.testing.assert_close(x_inv[0], x0[0] * factor**2)
    torch.testing.assert_close(x_inv[1], x0[1])  # t = 0.1: no grid step below it
    scores = torch.tensor([[0.25, 0.15]])
    batch = SimpleNamespace(scores=scores)
    e_th, e_ref = torch.tensor([[0.2, 0.4]]), torch.tensor([[0.3, 0.3]])
    loss, diag = algo.row_losses(batch, torch.tensor([0]), e_th, e_ref, {})
    w = smpo_soft_weight(scores[:, 0], scores[:, 1])
    expect, _ = dpo_loss(e_th[:, 0], e_th[:, 1], e_ref[:, 0], e_ref[:, 1], algo.beta, w)
    torch.testing.assert_close(loss, expect)
    assert diag["label_weight"].item() == pytest.approx(w.item())


def _captions_batch(n=3, seed=0):
    from alignrl.algorithms.base import OfflineBatch

    x0 = torch.randn(n, 1, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    return OfflineBatch(kind="captions", prompts=[f"p{i}" for i in range(n)], latents=x0,
                        global_index=np.arange(n), row_ids=np.arange(n))


def test_sample_ode_is_euler_for_flow_and_records_the_asked_step():
    """v = w x on a linear grid of T steps: each step multiplies x by 1 - w / T; the recorded step j holds
    x_T (1 - w/T)^j and the prediction w x there; ``reference`` samples with the reference's weight."""
    from alignrl.algorithms.preference import sample_ode

    backbone = FakeBackbone(0.5)
    ctx, _ = make_context(backbone, reference_w=0.2)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    final, x_rec, t_rec, pred = sample_ode(ctx, ["a"] * 3, x_T, 4, record=torch.tensor([0, 2, 3]))
    torch.testing.assert_close(final, x_T * (1 - 0.5 / 4) ** 4)
    for r, j in enumerate((0, 2, 3)):
        torch.testing.assert_close(x_rec[r], x_T[r] * (1 - 0.5 / 4) ** j)
        torch.testing.assert_close(pred[r], 0.5 * x_rec[r])
        assert t_rec[r].item() == pytest.approx(1000 * (1 - j / 4))
    torch.testing.assert_close(sample_ode(ctx, ["a"] * 3, x_T, 4, reference=True), x_T * (1 - 0.2 / 4) ** 4)


class GuidedFake(FakeBackbone):
    """v = w * g * x: the guidance scale g the caller asks for shows in the prediction."""

    def predict(self, x, timestep, cond, guidance_scale, transformer=None):
        return (transformer or self.denoiser).w * guidance_scale * x


@pytest.mark.parametrize("method", ["diffusion_dro", "ddo"])
def test_negatives_are_sampled_at_sample_guidance(method):
    """sample_guidance reaches the negatives' sampler (DRO: the policy's, DDO: the reference's); 1 keeps the
    references' guidance-free samples; below 1 is a one-line error."""
    from alignrl.algorithms.preference import DDO, DiffusionDRO, sample_ode
    from alignrl.errors import ConfigError

    cls = DiffusionDRO if method == "diffusion_dro" else DDO
    backbone = GuidedFake(0.2)
    ctx, _ = make_context(backbone, reference_w=0.2, lr=0.0)
    batch = _captions_batch()
    x_T = torch.stack([torch.randn((2, 4, 4), generator=g) for g in cls(sample_steps=3)._row_generators(ctx, batch)])
    for g in (1.0, 3.0):
        algo = cls(sample_steps=3, sample_guidance=g)
        aug = algo.augment(ctx, backbone.make_schedule(1000), batch)
        if method == "ddo":  # the final samples: Euler with v = 0.2 g x
            torch.testing.assert_close(aug.latents[:, 1], x_T * (1 - 0.2 * g / 3) ** 3)
        else:  # the recorded prediction at the recorded latent
            torch.testing.assert_close(aug.extra["target"], 0.2 * g * aug.latents[:, 1])
    torch.testing.assert_close(sample_ode(ctx, ["a"] * 3, x_T, 3, guidance=2.0), x_T * (1 - 0.4 / 3) ** 3)
    with pytest.raises(ConfigError, match="algorithm.sample_guidance must be >= 1"):
        cls(sample_guidance=0.5)


def test_dro_negative_is_the_policys_recorded_step_and_its_term_has_no_gradient_at_the_sampling_weights():
    """Diffusion-DRO: each expert row gets the policy's own sample's recorded (x_t, prediction); the expert is
    noised at that time. The policy term's target is the sampling weights' own prediction, so at those weights
    its error is 0 and its gradient vanishes: the step's gradient is the expert term's alone (hinge active)."""
    from alignrl.algorithms.preference import DiffusionDRO, dro_loss

    backbone = FakeBackbone(0.5)
    ctx, _ = make_context(backbone, reference_w=0.1, lr=0.0)
    algo = DiffusionDRO(sample_steps=4, prompt_dropout=0.0, margin=1e-3)
    batch = _captions_batch()
    schedule = backbone.make_schedule(1000)
    aug = algo.augment(ctx, schedule, batch)
    assert aug.latents.shape[1] == 2 and torch.equal(aug.latents[:, 0], batch.latents[:, 0])
    step = (1 - aug.extra["timestep"] / 1000) * 4  # the recorded step of each row, from its time
    assert torch.allclose(step, step.round()) and step.max() < 4
    idx, eps, _ = algo.draws(ctx, aug)
    torch.testing.assert_close(schedule.sigmas[idx[:, 0]], aug.extra["timestep"] / 1000, atol=1e-3, rtol=0)
    grads = []
    inner = ctx.optimizer_step
    ctx.optimizer_step = lambda: (grads.append(backbone.denoiser.w.grad.clone()), inner())[1]
    out = algo.train_step(batch, None, ctx)
    w = backbone.denoiser.w
    x0 = batch.latents[:, 0]
    sig = schedule.sigmas[idx[:, 0]].view(-1, 1, 1, 1)
    x_t = FLOW.add_noise(x0, eps[:, 0], sig)
    target = FLOW.target(x0, eps[:, 0], sig)
    e_th_e = ((w * x_t - target) ** 2).mean(dim=(1, 2, 3))
    e_ref_e = ((0.1 * x_t - target) ** 2).mean(dim=(1, 2, 3))
    x_p, pred_p = aug.latents[:, 1], aug.extra["target"]
    e_th_p = ((w * x_p - pred_p) ** 2).mean(dim=(1, 2, 3))
    e_ref_p = ((0.1 * x_p - pred_p) ** 2).mean(dim=(1, 2, 3))
    assert float(e_th_p.detach().abs().max()) < 1e-10
    loss, diag = dro_loss(e_th_e, e_ref_e.detach(), e_th_p, e_ref_p.detach(), 1e-3)
    assert out["policy_loss"] == pytest.approx(float(loss.detach().mean()), rel=1e-5)
    expert_only = torch.autograd.grad((torch.relu(e_th_e - e_ref_e.detach() + e_ref_p + 1e-3)).mean(), w)[0]
    assert torch.allclose(grads[0], expert_only, rtol=1e-5), (grads[0], expert_only)


def test_ddo_negatives_are_the_references_samples_and_at_the_reference_the_loss_is_1_plus_alpha_log_2():
    """DDO: the negatives are the reference's samples; with the policy equal to the reference d = 0 on both
    (likelihood ratio 1), so the loss is (1 + alpha) log 2."""
    from alignrl.algorithms.preference import DDO, sample_ode

    backbone = FakeBackbone(0.3)
    ctx, _ = make_context(backbone, reference_w=0.3, lr=0.0)
    algo = DDO(sample_steps=3, alpha=2.0, beta=10.0)
    batch = _captions_batch()
    aug = algo.augment(ctx, backbone.make_schedule(1000), batch)
    x_T = torch.stack([torch.randn((2, 4, 4), generator=g) for g in algo._row_generators(ctx, batch)])
    torch.testing.assert_close(aug.latents[:, 1], sample_ode(ctx, batch.prompts, x_T, 3, reference=True))
    out = algo.train_step(batch, None, ctx)
    assert out["policy_loss"] == pytest.approx(3 * np.log(2), rel=1e-6)
    assert out["d_data"] == pytest.approx(0.0, abs=1e-7) and out["d_ref_samples"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("method", ["flowgrpo", "awm"])
def test_padding_passes_for_sharded_weights_run_but_change_nothing(method):
    """distributed=fsdp: a process with fewer passes than the others pads to the agreed count (``ctx.balance``) with
    passes whose loss is multiplied by zero; the update equals the unpadded one, even with a dropped row (NaN
    advantage) as the padding row's source."""
    from alignrl.algorithms.flowgrpo import FlowGRPO
    from alignrl.algorithms.matching import AWM

    algo = FlowGRPO(group_size=2, lr=0.1, clip_range=0.2, beta=0.0) if method == "flowgrpo" else \
        AWM(group_size=2, num_train_timesteps=2, adv_clip_max=1.0)
    results = {}
    for pad in (0, 3):
        backbone = FakeBackbone(0.5)
        batch = transitions_batch(backbone, n=2, steps=3, trained=(0, 1) if method == "flowgrpo" else ())
        adv = leaf_advantages(batch, [float("nan"), 1.0], keep=[False, True])  # root 0 dropped (its row 0 pads)
        if method == "awm":  # final-sample methods read the leaves' advantages
            adv = Advantages(np.array([float("nan"), 1.0]), np.array([False, True]), np.zeros(0), np.zeros(0, bool), {})
        ctx, steps = make_context(backbone)
        passes = []
        ctx.balance = lambda n, pad=pad: n + pad
        ctx.backward = lambda loss: (passes.append(float(loss.detach())), loss.backward())
        out = algo.train_step(batch, adv, ctx)
        results[pad] = (float(backbone.denoiser.w.detach()), passes, out)
    w0, passes0, out0 = results[0]
    w3, passes3, out3 = results[3]
    assert len(passes3) == len(passes0) + 3 and passes3[-3:] == [0.0, 0.0, 0.0]
    assert w3 == w0 != 0.5  # the same update; it did train
    assert out3["policy_loss"] == out0["policy_loss"]  # padding passes count in no diagnostic


@pytest.mark.parametrize("method", ["diffusion_dpo", "diffusion_kto", "sft", "ddo"])
def test_offline_padding_passes_run_the_forwards_but_change_nothing(method):
    """distributed=fsdp for the offline methods: padding passes (a blank image, policy and reference forwards, loss x
    0) bring a process to the agreed pass count, KTO's reference-point forwards included; the update and every
    diagnostic equal the unpadded step's."""
    from alignrl.algorithms.base import OfflineBatch
    from alignrl.algorithms.preference import DDO, SFT, DiffusionDPO, DiffusionKTO

    x0 = torch.randn(3, 2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    results = {}
    for pad in (0, 2):
        backbone = FakeBackbone(0.5)
        ctx, _ = make_context(backbone, reference_w=0.3)
        if method == "diffusion_dpo":
            algo, batch = DiffusionDPO(beta=10.0), OfflineBatch(kind="pairs", prompts=["a", "b", "c"], latents=x0,
                                                                 global_index=np.arange(3), row_ids=np.arange(3))
        elif method == "diffusion_kto":
            algo = DiffusionKTO(beta=10.0)
            batch = OfflineBatch(kind="labels", prompts=["a", "b", "c"], latents=x0[:, :1], global_index=np.arange(3),
                                 row_ids=np.arange(3), labels=torch.tensor([1.0, 0.0, 1.0]))
        elif method == "ddo":  # it samples the reference's negatives inside the step: those chunks pad too
            algo, batch = DDO(sample_steps=3, alpha=2.0, beta=10.0), _captions_batch()
        else:
            algo, batch = SFT(), _captions_batch()
        calls = []
        predict = backbone.predict
        backbone.predict = lambda *a, **k: (calls.append(1), predict(*a, **k))[1]
        passes = []
        ctx.balance = lambda n, pad=pad: n + pad
        ctx.backward = lambda loss: (passes.append(float(loss.detach())), loss.backward())
        out = algo.train_step(batch, None, ctx)
        results[pad] = (float(backbone.denoiser.w.detach()), passes, out, len(calls))
    (w0, p0, out0, f0), (w2, p2, out2, f2) = results[0], results[2]
    assert len(p2) == len(p0) + 2 and p2[-2:] == [0.0, 0.0]
    assert w2 == w0 != 0.5 and out2 == out0
    # each padding pass ran the forwards a real pass runs (policy, and reference where used; KTO's reference-point
    # pass too), so sharded weights are gathered as often on every process
    # (DDO: a padded sampling chunk is 3 reference steps, a padded training pass a policy and a reference forward)
    per_pass = {"diffusion_dpo": 2, "diffusion_kto": 4, "sft": 1, "ddo": 5}[method]
    assert f2 == f0 + 2 * per_pass


def test_pass_rows_gathered_whole_or_per_pass_give_the_same_update(monkeypatch):
    """An optimizer step's rows gathered once in pass order (small steps) or per pass (large ones) are the same
    rows: the update, its diagnostics and the weights after it are bit for bit equal."""
    import alignrl.algorithms.policy_gradient as pg
    from alignrl.algorithms.flowgrpo import FlowGRPO

    results = []
    for budget in (pg.WHOLE_GATHER_BYTES, 0):
        monkeypatch.setattr(pg, "WHOLE_GATHER_BYTES", budget)
        backbone = FakeBackbone()
        batch = transitions_batch(backbone, n=4, steps=4, trained=(0, 1, 3))
        ctx, _ = make_context(backbone, updates=2, epochs=2, lr=0.05)
        out = FlowGRPO(group_size=2, clip_range=0.2, beta=0.0).train_step(
            batch, leaf_advantages(batch, [1.0, -0.5, 0.25, -1.0]), ctx)
        results.append((out, backbone.denoiser.w.detach().clone()))
    (a, wa), (b, wb) = results
    assert torch.equal(wa, wb) and not torch.equal(wa, torch.tensor(0.5))  # it moved, alike
    assert a == b
