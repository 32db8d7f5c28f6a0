"""Plans and the rollout engine on the tiny SD3 and FLUX backbones."""

import pytest
import torch

from alignrl.backbones.base import Conditioning
from alignrl.errors import ConfigError
from alignrl.sampling.engine import rollout, sample_generators
from alignrl.sampling.plans import FlowGRPOPlanner, RolloutPlan, StepSpec, ode_plan


class CountingTransformer(torch.nn.Module):
    """Wraps a transformer and counts forward calls and rows."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.rows = 0

    def forward(self, **kw):
        self.calls += 1
        self.rows += kw["hidden_states"].shape[0]
        return self.inner(**kw)


def test_schedule_comes_from_scheduler(tiny_sd3):
    s = tiny_sd3.make_schedule(10)
    assert s.sigmas.shape == (11,) and s.timesteps.shape == (10,)
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    # the smallest nonzero sigma is shifted twice by the diffusers scheduler (shift 3, T=10)
    assert s.sigmas[-2].item() == pytest.approx(0.00893, abs=1e-4)
    assert torch.allclose(s.timesteps, s.sigmas[:-1] * 1000)


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_ode_plan_matches_diffusers_pipeline(name, request):
    bb = request.getfixturevalue(name)
    prompts = ["a photo of a cat", "a red car on the beach", "a blue boat", "a tree"]
    cond = bb.encode_prompts(prompts)
    guidance = 4.5 if bb.uses_cfg else 3.5
    ours = rollout(bb, ode_plan(6, guidance), cond, sample_generators(0, 0, range(4))).final
    x0 = bb.initial_noise(sample_generators(0, 0, range(4)))
    kw = dict(prompt_embeds=cond.tensors["prompt_embeds"], pooled_prompt_embeds=cond.tensors["pooled"],
              latents=x0, num_inference_steps=6, guidance_scale=guidance, output_type="latent", height=64, width=64)
    if bb.uses_cfg:
        neg = bb.negative_conditioning().expand(4)
        kw.update(negative_prompt_embeds=neg.tensors["prompt_embeds"],
                  negative_pooled_prompt_embeds=neg.tensors["pooled"])
    theirs = bb.pipe(**kw).images
    assert torch.equal(ours, theirs)


def test_prompt_cache_reuses_embeddings(tiny_sd3):
    tiny_sd3.cache.entries.clear()
    a = tiny_sd3.encode_prompts(["a red cat", "a blue dog", "a red cat"])
    assert set(tiny_sd3.cache.entries) == {"a red cat", "a blue dog"}
    assert torch.equal(a.tensors["prompt_embeds"][0], a.tensors["prompt_embeds"][2])
    b = tiny_sd3.encode_prompts(["a blue dog"])
    assert torch.equal(b.tensors["prompt_embeds"][0], a.tensors["prompt_embeds"][1])


def test_cached_rows_of_repeated_prompts_and_prebuilt_cfg_conditioning_equal_the_plain_path(tiny_sd3):
    """A group's repeated prompts are gathered from their distinct rows; an update's [empty; prompt] conditioning
    built once and gathered per pass (``cfg_conditioning``, then ``index``) predicts exactly what the per-call
    concatenation does, and is refused where it would be wrong."""
    prompts = ["a red cat", "a blue dog", "a red cat", "a red cat", "a green owl", "a blue dog"]
    tiny_sd3.cache.entries.clear()
    tiny_sd3.encode_prompts(prompts)
    got = tiny_sd3.cache.get(prompts)
    want = Conditioning.cat(tiny_sd3.cache.entries[p] for p in prompts)
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    rows = torch.tensor([4, 1, 3])
    x = torch.randn(3, *tiny_sd3.latent_shape())
    t = tiny_sd3.make_schedule(4).timesteps[1]
    plain = tiny_sd3.predict(x, t, got.index(rows), 4.5)
    both = tiny_sd3.cfg_conditioning(got)
    assert both.batch_size == 2 * len(prompts) and both.with_negative
    assert torch.equal(tiny_sd3.predict(x, t, both.index(rows), 4.5), plain)
    with pytest.raises(ValueError, match="twice as many"):
        tiny_sd3.predict(x[:2], t, both.index(rows), 4.5)
    with pytest.raises(ValueError, match="without guidance"):
        tiny_sd3.predict(x, t, both.index(rows), 1.0)
    with pytest.raises(ValueError, match="1-D tensor of prompt rows"):
        both.index(slice(0, 2))


def test_sde_step_factors_are_computed_once_per_step_and_equal_the_kernel(tiny_sd3):
    """apply_step keeps a reverse-SDE step's schedule factors on the schedule; the step equals the kernel called
    directly, bit for bit, sampled and re-scored, and each (kernel, step) is computed once."""
    from alignrl.sampling.engine import apply_step
    from alignrl.sampling.kernels import KERNELS

    schedule = tiny_sd3.make_schedule(6)
    schedule.memo.clear()
    torch.manual_seed(0)
    x, v, eps = (torch.randn(3, *tiny_sd3.latent_shape()) for _ in range(3))
    for kind in ("sde", "wan"):
        spec = StepSpec(kind=kind, noise_level=0.7, trained=True)
        for i in (0, 2, 2):
            got = apply_step(tiny_sd3, spec, schedule, i, x, v, noise=eps)
            want = KERNELS[kind](x, v, schedule.sigmas[i], schedule.sigmas[i + 1], noise_level=0.7,
                                 sigma_max_guard=schedule.sigmas[1], noise=eps)
            again = apply_step(tiny_sd3, spec, schedule, i, x, v, next_x=got.next_x)
            assert torch.equal(got.next_x, want.next_x) and torch.equal(got.logp_mean_per_dim, want.logp_mean_per_dim)
            assert torch.equal(again.logp_mean_per_dim, want.logp_mean_per_dim)
    assert sorted((k[0], k[1]) for k in schedule.memo) == [("sde", 0), ("sde", 2), ("wan", 0), ("wan", 2)]


def test_model_evals_and_trained_steps_follow_the_plan(tiny_sd3):
    counter = CountingTransformer(tiny_sd3.transformer)
    planner = FlowGRPOPlanner(num_steps=10, timestep_fraction=0.99, guidance_scale=4.5)
    plan = planner.plan()
    assert plan.trained_steps == list(range(9))  # the last step is never trained
    cond = tiny_sd3.encode_prompts(["a cat"] * 3)
    out = rollout(tiny_sd3, plan, cond, sample_generators(0, 0, range(3)), transformer=counter)
    assert counter.calls == 10  # one batched forward per step, CFG inside
    assert counter.rows == plan.model_evals(3, evals_per_predict=2) == 60
    assert [r.step for r in out.records] == plan.trained_steps
    st = out.stacked()
    assert st["x"].shape[:2] == (3, 9) and st["logp_old"].shape == (3, 9)
    # each recorded transition chains: next_x of step j is x of step j+1
    assert torch.equal(st["next_x"][:, 0], st["x"][:, 1])


def test_branching_plan_counts_and_shares_prefixes(tiny_flux):
    counter = CountingTransformer(tiny_flux.transformer)
    steps = []
    for i in range(8):
        steps.append(StepSpec(kind="sde", noise_level=0.9, trained=True, branch=2 if i in (0, 3) else 1))
    plan = RolloutPlan("tree", 3.5, tuple(steps))
    cond = tiny_flux.encode_prompts(["a cat", "a dog"])
    out = rollout(tiny_flux, plan, cond, sample_generators(0, 0, range(2)), transformer=counter)
    # 2 roots x 2 after step 0 = 4 rows for steps 0-2, x2 again = 8 rows for steps 3-7
    assert counter.rows == plan.model_evals(2) == 4 * 3 + 8 * 5
    assert out.final.shape[0] == 8 and plan.leaves_per_root == 4
    assert out.leaf_root.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # siblings start from the same latent and diverge by their own noise
    rec3 = out.records[3]
    assert torch.equal(rec3.x[0], rec3.x[1]) and not torch.equal(rec3.next_x[0], rec3.next_x[1])


def test_samples_do_not_depend_on_batching(tiny_sd3):
    plan = FlowGRPOPlanner(num_steps=4).plan()
    prompts = ["a cat", "a dog", "a bird", "a boat"]
    full = rollout(tiny_sd3, plan, tiny_sd3.encode_prompts(prompts), sample_generators(7, 3, range(4)))
    part = rollout(tiny_sd3, plan, tiny_sd3.encode_prompts(prompts[2:]), sample_generators(7, 3, [2, 3]))
    assert torch.allclose(full.final[2:], part.final, atol=1e-5)
    assert torch.allclose(full.stacked()["logp_old"][2:], part.stacked()["logp_old"], atol=1e-5)


def test_plan_rejects_bad_steps():
    with pytest.raises(ConfigError):
        StepSpec(kind="ode", trained=True)
    with pytest.raises(ConfigError):
        StepSpec(kind="euler_magic")
    with pytest.raises(ConfigError):
        FlowGRPOPlanner(num_steps=10, timestep_fraction=0.05)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_from_pretrained_loads_a_saved_pipeline(family, tmp_path, request):
    """The real loading code (diffusers from_pretrained on a local directory), offline."""
    from alignrl.backbones.flux import FluxBackbone
    from alignrl.backbones.sd3 import SD3Backbone

    bb = request.getfixturevalue(f"tiny_{family}")
    bb.pipe.save_pretrained(tmp_path / "model")
    cls = SD3Backbone if family == "sd3" else FluxBackbone
    loaded = cls.from_pretrained(str(tmp_path / "model"), resolution=64, max_sequence_length=32, dtype="fp32")
    guidance = 4.5 if family == "sd3" else 3.5
    prompts = ["a photo of a cat", "a blue boat"]
    a = rollout(bb, ode_plan(3, guidance), bb.encode_prompts(prompts), sample_generators(1, 0, range(2))).final
    b = rollout(loaded, ode_plan(3, guidance), loaded.encode_prompts(prompts), sample_generators(1, 0, range(2))).final
    assert torch.equal(a, b)


def test_flux_static_shift_is_the_dance_schedule_in_training_and_in_the_pipeline():
    """backbone.static_shift=3: sigmas 3t / (1 + 2t) over linspace(1, 0, N + 1) (DanceGRPO's and MixGRPO's FLUX
    schedule) for the engine, and the same scheduler in the pipeline an export writes; null keeps FLUX's
    resolution-dependent shift."""
    import numpy as np

    from alignrl.backbones.flux import FluxBackbone
    from alignrl.errors import ConfigError

    t = np.linspace(1.0, 0.0, 17)
    static = FluxBackbone.tiny(static_shift=3.0)
    sched = static.make_schedule(16)
    assert np.allclose(sched.sigmas.numpy(), 3 * t / (1 + 2 * t), atol=1e-6)
    assert np.allclose(sched.timesteps.numpy(), 1000 * (3 * t / (1 + 2 * t))[:-1], atol=1e-3)
    assert static.pipe.scheduler.config.use_dynamic_shifting is False and static.pipe.scheduler.config.shift == 3.0
    dynamic = FluxBackbone.tiny().make_schedule(16)
    assert not np.allclose(dynamic.sigmas.numpy(), sched.sigmas.numpy(), atol=1e-3)
    with pytest.raises(ConfigError, match="static_shift=0"):
        FluxBackbone.tiny(static_shift=0)


def test_sd3_text_encoding_equals_the_pipeline_bit_for_bit(tiny_sd3, caplog):
    """The backbone's own SD3 text encoding (each tokenizer called once, over all chunks) returns what the pipeline's
    encode_prompt returns, bit for bit, truncated prompts included, and warns once per cut prompt and encoder."""
    import logging

    long = "a photo of " + "very " * 60 + "red cat"
    prompts = [long, "a cat", "", "two dogs on a red sofa", "a", "b c", "ünïcode prompt", "a blue boat"]
    embeds, _, pooled, _ = tiny_sd3.pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=tiny_sd3.device, do_classifier_free_guidance=False,
        max_sequence_length=tiny_sd3.max_sequence_length)
    with caplog.at_level(logging.WARNING, logger="alignrl.backbones.base"):
        one, two = tiny_sd3._encode_chunks([prompts, prompts[::-1]])
    assert torch.equal(one.tensors["prompt_embeds"], embeds) and torch.equal(one.tensors["pooled"], pooled)
    assert torch.equal(two.tensors["prompt_embeds"], embeds.flip(0)) and torch.equal(two.tensors["pooled"], pooled.flip(0))
    cut = [r.getMessage() for r in caplog.records if r.name == "alignrl.backbones.base"]
    assert len(cut) == 2 * 3 and all("a photo of very" in m for m in cut)  # 2 chunks x (2 CLIPs + T5)
    assert any("T5 (backbone.max_sequence_length=" in m for m in cut)


@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_prompt_table_gathers_what_the_cache_and_the_cfg_concatenation_give(tiny_sd3, cfg):
    prompts = ["a red cat", "a blue dog", "a red cat", "a green owl"]
    table = tiny_sd3.prompt_table(prompts, cfg)
    items = [3, 0, 2, 2, 1]
    got = table.conditioning(items)
    plain = tiny_sd3.encode_prompts([prompts[i] for i in items])
    want = tiny_sd3.cfg_conditioning(plain) if cfg > 1 else plain
    assert got.with_negative == (cfg > 1) and got.batch_size == want.batch_size
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    assert table.rows.batch_size == 3 + (cfg > 1)  # each distinct prompt once, and the empty prompt under CFG


def test_noise_drawn_ahead_equals_successive_draws_and_the_rollout_is_unchanged(tiny_sd3, monkeypatch):
    """A linear plan's step noise drawn in one call per sample gives the values of the step-by-step draws and leaves
    each generator where they would (checked once per size); where that cannot hold, nothing is drawn ahead."""
    import alignrl.sampling.engine as engine

    shape = tiny_sd3.latent_shape()
    ahead = engine.draw_noise_ahead(sample_generators(3, 1, range(4)), shape, 5, "cpu")
    gens = sample_generators(3, 1, range(4))
    for k in range(5):
        assert torch.equal(ahead[k], engine.draw_noise(gens, shape, "cpu"))
    after = sample_generators(3, 1, range(4))
    engine.draw_noise_ahead(after, shape, 5, "cpu")
    assert all(torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b)) for a, b in zip(after, gens))
    assert engine.draw_noise_ahead(sample_generators(3, 1, range(2)), (5, 5), 4, "cpu") is None  # 25 values
    assert engine.draw_noise_ahead(sample_generators(3, 1, range(2)), shape, 1, "cpu") is None
    plan = FlowGRPOPlanner(num_steps=5, guidance_scale=4.5).plan(torch.Generator().manual_seed(0))
    cond = tiny_sd3.encode_prompts(["a red cat", "a blue boat"])
    fast = rollout(tiny_sd3, plan, cond, sample_generators(0, 2, [5, 9]))
    monkeypatch.setattr(engine, "draw_noise_ahead", lambda *a, **k: None)
    slow = rollout(tiny_sd3, plan, cond, sample_generators(0, 2, [5, 9]))
    assert torch.equal(fast.final, slow.final)
    assert all(torch.equal(a.next_x, b.next_x) and torch.equal(a.logp_old, b.logp_old)
               for a, b in zip(fast.records, slow.records))


def test_encode_ahead_fills_the_encoder_batch_with_the_next_iterations_prompts(tiny_sd3):
    """The rollout encodes an iteration's new prompts with the following iterations' (the sampler's slots are known
    in advance) until the encoder batch is full; each embedding is the one its prompt gets encoded alone."""
    from types import SimpleNamespace

    from alignrl.backbones.base import ENCODE_BATCH
    from alignrl.training.collect import RolloutCollector

    prompts = [f"prompt number {i}" for i in range(40)]
    per_iteration = 3  # three new prompts an iteration, each twice
    slots = lambda it: [SimpleNamespace(prompt_id=it * per_iteration + k % per_iteration)  # noqa: E731
                        for k in range(2 * per_iteration)]
    collector = RolloutCollector(*[None] * 14)
    collector.backbone, collector.prompts = tiny_sd3, SimpleNamespace(prompts=prompts)
    collector.sampler = SimpleNamespace(rank_slots=slots)
    tiny_sd3.cache.entries.clear()
    calls = []
    encode = tiny_sd3._encode_fixed
    tiny_sd3._encode_fixed = lambda ps: calls.append(list(ps)) or encode(ps)
    try:
        collector.encode_ahead(0, slots(0))
        collector.encode_ahead(1, slots(1))  # iteration 1's prompts were all encoded ahead: nothing to do
        collector.encode_ahead(2, slots(2))
    finally:
        del tiny_sd3._encode_fixed
    assert calls == [prompts[:ENCODE_BATCH], prompts[ENCODE_BATCH:2 * ENCODE_BATCH]]
    for p in (prompts[0], prompts[7], prompts[9]):
        alone = tiny_sd3._encode_fixed([p])
        assert all(torch.equal(tiny_sd3.cache.entries[p].tensors[k], alone.tensors[k]) for k in alone.tensors)
