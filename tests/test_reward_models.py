"""Model rewards (PickScore, CLIPScore, aesthetic, OCR) through their real code, on tiny local weights.

The CLIP rewards load a tiny random-init CLIPModel saved to a temporary folder (same classes as the
real checkpoints); the OCR reward runs the real PP-OCR models shipped in rapidocr-onnxruntime's wheel.
"""

import inspect
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from alignrl.errors import ConfigError
from alignrl.rewards import clip as clip_mod
from alignrl.rewards.base import REWARDS, WeightedReward, build_reward
from conftest import render_text
from alignrl.rewards.ocr import extract_targets, levenshtein, normalise, text_match

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat", "a photo of a dog on the beach", "a red cat", "sunset over the city"]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIP processor saved like a hub checkpoint (32px input, patch 8)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from alignrl.backbones.tiny import tiny_clip_config, tiny_clip_tokenizer

    text = tiny_clip_config(projection=True, hidden=32, layers=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))  # not the init value, so a missing exp()/scale shows
    out = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer()).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(tiny_clip_dir):
    """The same weights and processor loaded directly with transformers (the hand computation)."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval().requires_grad_(False)
    return model, AutoProcessor.from_pretrained(tiny_clip_dir)


def _quantised_images(n, h=32, w=32, seed=0):
    """Smooth random images on the uint8 grid (so a PIL-based processor sees exactly the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 3, h, w, generator=g), 3, 1, 1)
    return (x * 255).round() / 255


def _to_pil(images):
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in images]


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _ref_embeddings(reference, images, prompts):
    model, proc = reference
    with torch.no_grad():
        pix = proc(images=_to_pil(images), return_tensors="pt")["pixel_values"]
        img = F.normalize(_feat(model.get_image_features(pixel_values=pix)), dim=-1)
        tok = proc.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = F.normalize(_feat(model.get_text_features(**tok)), dim=-1)
    return img, txt, model


def _head_state(dim=16, seed=1):
    """A random state dict in the LAION aesthetic MLP layout (layers 0, 2, 4, 6, 7 are Linear)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(0, dim, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for idx, fan_in, fan_out in sizes:
        state[f"layers.{idx}.weight"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        state[f"layers.{idx}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    return state


def _manual_mlp(state, x):
    for idx in (0, 2, 4, 6, 7):  # dropout layers are identity in eval; no activations in this MLP
        x = F.linear(x, state[f"layers.{idx}.weight"], state[f"layers.{idx}.bias"])
    return x.squeeze(-1)


class _NotATensor:  # pickled into a .pth: weights_only=True must refuse it
    pass


# ---------------------------------------------------------------------------------------------
# CLIP rewards


def test_torch_preprocessing_matches_the_clip_processor(reference):
    proc = reference[1]
    ip = proc.image_processor
    for h, w in [(32, 32), (64, 96), (96, 64), (24, 40)]:
        images = _quantised_images(2, h, w, seed=h + w)
        ref = proc(images=_to_pil(images), return_tensors="pt")["pixel_values"]
        ours = clip_mod.clip_preprocess(images, resize=32, crop=(32, 32), mean=ip.image_mean, std=ip.image_std)
        assert ours.shape == ref.shape == (2, 3, 32, 32)
        # PIL resizes on uint8, the torch path in float: within about one uint8 step after normalising
        assert (ours - ref).abs().max() < (1.5 / 255) / min(ip.image_std), (h, w)
        if (h, w) == (32, 32):
            assert torch.allclose(ours, ref, atol=1e-6)


def test_pickscore_equals_hand_computation(tiny_clip_dir, reference):
    reward = build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir))
    images = _quantised_images(4)
    scores, info = reward(images, PROMPTS, [{}] * 4)
    assert scores.shape == (4,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    img, txt, model = _ref_embeddings(reference, images, PROMPTS)
    expected = (model.logit_scale.exp() * (img * txt).sum(-1) / 26).double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert info["mean"] == pytest.approx(expected.mean(), rel=1e-5)
    assert reward.differentiable is False and REWARDS["pickscore"].differentiable is False
    # the scale option, also as a fraction written in the recipe
    raw, _ = build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir), scale=1.0)(
        images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(raw / 26, scores, rtol=1e-5)
    frac, _ = build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir), scale="1/26")(
        images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(frac, scores, rtol=1e-6)


def _spm_checkpoint(tiny_clip_dir, path, neutral: bool, drop_time: bool = False):
    """A step-aware preference model checkpoint in SPO's key layout ('model.' + the time-conditioned CLIP's keys,
    torch-saved). neutral: every modulation is the identity (shift 0, scale 0, gate 1) at every timestep."""
    from transformers import CLIPModel

    state = {f"model.{k}": v for k, v in CLIPModel.from_pretrained(tiny_clip_dir).state_dict().items()}
    d, g = 32, torch.Generator().manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    state.update({"model.t_embedder.mlp.0.weight": rnd(d, 256), "model.t_embedder.mlp.0.bias": rnd(d),
                  "model.t_embedder.mlp.2.weight": rnd(d, d), "model.t_embedder.mlp.2.bias": rnd(d)})
    for i in range(2):
        bias = torch.zeros(6 * d) if neutral else rnd(6 * d)
        bias[2 * d:3 * d] += 1
        bias[5 * d:] += 1
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = \
            torch.zeros(6 * d, d) if neutral else rnd(6 * d, d)
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = bias
    state["model.vision_model.adaLN_modulation.1.weight"] = torch.zeros(2 * d, d) if neutral else rnd(2 * d, d)
    state["model.vision_model.adaLN_modulation.1.bias"] = torch.zeros(2 * d) if neutral else rnd(2 * d)
    if drop_time:
        state = {k: v for k, v in state.items() if "adaLN" not in k}
    torch.save(state, path)
    return path


def test_step_aware_pickscore_reads_spo_checkpoints_and_the_timestep(tiny_clip_dir, reference, tmp_path):
    """SPO's step-aware preference model: with identity modulation it is PickScore (logit scale, scale 1) to float
    rounding, so the time-conditioned vision forward is CLIP's own; with a trained-like checkpoint the score
    depends on each image's spo_timestep; checkpoints without the time conditioning, or none, are refused."""
    images = _quantised_images(4, seed=2)
    kw = {"model": str(tiny_clip_dir), "processor": str(tiny_clip_dir)}
    neutral = build_reward("step_aware_pickscore", checkpoint=str(_spm_checkpoint(tiny_clip_dir, tmp_path / "n.bin",
                                                                                   True)), **kw)
    img, txt, model = _ref_embeddings(reference, images, PROMPTS)
    expected = (model.logit_scale.exp() * (img * txt).sum(-1)).double().numpy()
    for t in (0, 700):
        got, _ = neutral(images, PROMPTS, [{"spo_timestep": t}] * 4)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    spm = build_reward("step_aware_pickscore", checkpoint=str(_spm_checkpoint(tiny_clip_dir, tmp_path / "s.bin",
                                                                               False)), **kw)
    early, _ = spm(images, PROMPTS, [{"spo_timestep": 900}] * 4)
    late, _ = spm(images, PROMPTS, [{"spo_timestep": 0}] * 4)
    default, _ = spm(images, PROMPTS, [{}] * 4)  # no timestep: a clean image
    mixed, _ = spm(images, PROMPTS, [{"spo_timestep": 900}, {"spo_timestep": 0}] * 2)
    assert np.abs(early - late).min() > 1e-3 and np.allclose(default, late)
    np.testing.assert_allclose(mixed, [early[0], late[1], early[2], late[3]], rtol=1e-5)
    with pytest.raises(ConfigError, match="lacks the time conditioning"):
        build_reward("step_aware_pickscore", checkpoint=str(_spm_checkpoint(
            tiny_clip_dir, tmp_path / "plain.bin", False, drop_time=True)), **kw)
    with pytest.raises(ConfigError, match="needs its time-conditioned weights"):
        build_reward("step_aware_pickscore", **kw)


def test_clipscore_is_scaled_cosine(tiny_clip_dir, reference):
    images = _quantised_images(4, seed=3)
    scores, _ = build_reward("clipscore", model=str(tiny_clip_dir))(images, PROMPTS, [{}] * 4)  # processor: the model's
    img, txt, _ = _ref_embeddings(reference, images, PROMPTS)
    np.testing.assert_allclose(scores, (100 * (img * txt).sum(-1)).double().numpy(), rtol=1e-5, atol=1e-5)
    cos, _ = build_reward("clipscore", model=str(tiny_clip_dir), scale=1.0)(images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(cos * 100, scores, rtol=1e-5)
    assert np.all(np.abs(cos) <= 1.0 + 1e-6)


def test_batching_does_not_change_scores(tiny_clip_dir):
    images = _quantised_images(5, 48, 40, seed=5)
    prompts = PROMPTS + ["a green tree"]
    big = build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir), batch_size=32)
    small = build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir), batch_size=2)
    a, _ = big(images, prompts, [{}] * 5)
    b, _ = small(images, prompts, [{}] * 5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # each sample's score does not depend on the rest of the batch
    one, _ = big(images[3:4], prompts[3:4], [{}])
    assert one[0] == pytest.approx(a[3], rel=1e-5, abs=1e-6)


def test_differentiable_mode_passes_gradients_to_images(tiny_clip_dir):
    images = _quantised_images(3, 40, 40, seed=7)
    prompts = PROMPTS[:3]
    diff = build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir), differentiable=True)
    assert diff.differentiable is True
    x = images.clone().requires_grad_(True)
    s = diff.score_tensor(x, prompts)
    assert s.shape == (3,) and s.grad_fn is not None
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(x.grad[i].abs().sum() > 0 for i in range(3))  # every image gets its own gradient

    plain = build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir))
    y = images.clone().requires_grad_(True)
    t = plain.score_tensor(y, prompts)
    assert t.grad_fn is None and not t.requires_grad  # no graph without differentiable=true
    # both modes share the torch preprocessing, so they give the same numbers
    torch.testing.assert_close(t, s.detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diff(images, prompts, [{}] * 3)[0], plain(images, prompts, [{}] * 3)[0], rtol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_aesthetic_matches_manual_mlp(tiny_clip_dir, reference, tmp_path, fmt):
    state = _head_state()
    path = tmp_path / f"head.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    reward = build_reward("aesthetic", model=str(tiny_clip_dir), head=str(path))
    images = _quantised_images(3, seed=11)
    scores, info = reward(images, ["a", "b", "c"], [{}] * 3)
    img, _, _ = _ref_embeddings(reference, images, ["a", "b", "c"])
    expected = _manual_mlp(state, img).double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert info["mean"] == pytest.approx(expected.mean(), rel=1e-5, abs=1e-6)
    # the prompt is ignored
    again, _ = reward(images, ["something else entirely"] * 3, [{}] * 3)
    np.testing.assert_array_equal(again, scores)


def test_aesthetic_head_errors_name_the_option(tiny_clip_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.aesthetic\.head="):
        build_reward("aesthetic", model=str(tiny_clip_dir))
    with pytest.raises(ConfigError, match=r"reward\.aesthetic\.head.*does not exist"):
        build_reward("aesthetic", model=str(tiny_clip_dir), head=str(tmp_path / "nope.pth"))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({**_head_state(), "extra": _NotATensor()}, unsafe)
    with pytest.raises(ConfigError, match=r"weights_only=True.*|cannot read head"):
        build_reward("aesthetic", model=str(tiny_clip_dir), head=str(unsafe))
    wrong_dim = tmp_path / "wide.safetensors"
    from safetensors.torch import save_file

    save_file(_head_state(dim=768), str(wrong_dim))  # a real-size head does not fit the 16-d tiny CLIP
    with pytest.raises(ConfigError, match=r"768-d.*16-d.*reward\.aesthetic\.model"):
        build_reward("aesthetic", model=str(tiny_clip_dir), head=str(wrong_dim))


def test_unloadable_models_raise_config_errors_naming_the_option(tiny_clip_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.pickscore\.model") as e:
        build_reward("pickscore", model=str(tmp_path / "missing"), processor=str(tiny_clip_dir))
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"cannot load CLIP model .*reward\.clipscore\.model=") as e:
        build_reward("clipscore", model=str(empty), processor=str(tiny_clip_dir))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"reward\.pickscore\.processor"):
        build_reward("pickscore", model=str(tiny_clip_dir), processor=str(empty))
    with pytest.raises(ConfigError, match=r"reward\.pickscore\.dtype"):
        build_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir), dtype="fp8")
    with pytest.raises(ConfigError, match=r"reward\.clipscore\.batch_size"):
        build_reward("clipscore", model=str(tiny_clip_dir), batch_size=0)
    with pytest.raises(ConfigError, match=r"reward\.clipscore\.scale"):
        build_reward("clipscore", model=str(tiny_clip_dir), scale="lots")
    with pytest.raises(ConfigError, match=r"bad options"):
        build_reward("clipscore", model=str(tiny_clip_dir), bogus=1)


def test_models_are_frozen_on_the_resolved_device(tiny_clip_dir):
    reward = build_reward("clipscore", model=str(tiny_clip_dir))
    assert reward.device == torch.device("cpu") or torch.cuda.is_available()
    assert reward.dtype == (torch.float32 if reward.device.type == "cpu" else torch.float16)
    assert not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())


def test_auto_device_respects_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert clip_mod.resolve_device("auto", "x") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "5")  # one visible device per process: use the current one
    assert clip_mod.resolve_device("auto", "x") == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert clip_mod.resolve_device(None, "x") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert clip_mod.resolve_device("auto", "x") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"reward\.x\.device=cuda"):
        clip_mod.resolve_device("cuda", "x")
    assert clip_mod.resolve_dtype("auto", torch.device("cpu"), "x") == torch.float32
    assert clip_mod.resolve_dtype("auto", torch.device("cuda", 0), "x") == torch.float16


# ---------------------------------------------------------------------------------------------
# OCR


def test_levenshtein_and_matching():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("sitting", "kitten") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0
    assert normalise("  Hello \t World\n") == "helloworld"
    assert text_match("OPEN 24 Hours", "open 24") == 1.0  # substring, case and spaces ignored
    assert text_match("HELLX", "hello") == pytest.approx(0.8)
    assert text_match("", "hello") == 0.0
    assert text_match("completely unrelated words", "hi") == 0.0  # distance clipped at the target length
    with pytest.raises(ValueError):
        text_match("x", "  ")


def test_target_extraction():
    assert extract_targets('a sign that says "HELLO"') == ["HELLO"]
    assert extract_targets("a neon sign reading \u201cOpen Late\u201d") == ["Open Late"]
    assert extract_targets("the cat's poster says 'don't stop'") == ["don't stop"]
    assert extract_targets("a mug with \u2018Mom\u2019s Coffee\u2019 on it") == ["Mom\u2019s Coffee"]
    assert extract_targets('"STOP" above "GO" with a \'single\'') == ["STOP", "GO"]  # double quotes win
    assert extract_targets("a cat's toy and the dogs' bowl") == []
    assert extract_targets('an empty sign "" ') == []


def test_ocr_reads_rendered_text():
    reward = build_reward("ocr")
    g = torch.Generator().manual_seed(0)
    images = torch.stack([
        render_text("HELLO"), render_text("HELLX"), torch.rand(3, 128, 320, generator=g),
        render_text("Hello World", size=40), render_text("HELLO"),
    ])
    prompts = ['a sign that says "HELLO"', 'a sign that says "HELLO"', 'a sign that says "HELLO"',
               "a banner reading 'hello world'", "a sign with no quoted text"]
    scores, info = reward(images, prompts, [{}] * 5)
    assert scores.dtype == np.float64 and scores.shape == (5,)
    assert scores[0] >= 0.9
    assert 0.6 <= scores[1] <= 0.9  # one wrong letter of five: about 0.8
    assert scores[2] <= 0.2
    assert scores[3] >= 0.9
    assert math.isnan(scores[4]) and info["no_target"] == 1
    assert info["mean"] == pytest.approx(np.nanmean(scores))
    exact = info["per_sample"]["exact"]
    assert exact[0] == 1.0 and exact[1] == 0.0 and exact[2] == 0.0 and math.isnan(exact[4])


def test_weighted_ocr_and_aesthetic(tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    save_file(_head_state(), str(tmp_path / "head.safetensors"))
    w = WeightedReward.from_config({
        "ocr": 1.0,
        "aesthetic": {"weight": 0.5, "model": str(tiny_clip_dir), "head": str(tmp_path / "head.safetensors")},
    })
    images = torch.stack([render_text("CAT"), torch.full((3, 128, 320), 0.5)])
    prompts = ['a sign that says "CAT"', 'a sign that says "CAT"']
    total, info = w(images, prompts, [{}, {}])
    ocr, aes = info["per_reward"]["ocr"], info["per_reward"]["aesthetic"]
    assert ocr[0] >= 0.9 and ocr[1] <= 0.2
    assert np.isfinite(aes).all() and aes[0] != aes[1]
    np.testing.assert_allclose(total, ocr + 0.5 * aes)
    assert info["ocr/mean"] == pytest.approx(ocr.mean())
    assert info["aesthetic/mean"] == pytest.approx(aes.mean())
    assert "ocr/exact" in info["per_sample"] and w.per_sample_keys == ["ocr/exact"]


# ---------------------------------------------------------------------------------------------
# missing packages, recipes


@pytest.mark.parametrize("reward, module, extra", [
    ("ocr", "rapidocr_onnxruntime", "ocr"),
    ("hpsv2", "open_clip", "hpsv2"),
    ("imagereward", "ImageReward", "imagereward"),
])
def test_missing_package_names_the_extra(monkeypatch, reward, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError, installed or not
    with pytest.raises(ConfigError, match=rf"pip install 'alignrl\[{extra}\]'") as e:
        build_reward(reward)
    if reward != "ocr":
        assert "reward=remote" in str(e.value)


def _recipe(name):
    return OmegaConf.to_container(OmegaConf.load(REPO / "recipes" / "reward" / f"{name}.yaml"))[name]


def test_reward_recipes_build(tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    save_file(_head_state(), str(tmp_path / "head.safetensors"))
    local = {"model": str(tiny_clip_dir)}
    overrides = {
        "pickscore": {**local, "processor": str(tiny_clip_dir)},
        "clipscore": local,
        "aesthetic": {**local, "head": str(tmp_path / "head.safetensors")},
        "ocr": {},
        "step_aware_pickscore": {**local, "processor": str(tiny_clip_dir),
                                 "checkpoint": str(_spm_checkpoint(tiny_clip_dir, tmp_path / "spm.bin", False))},
    }
    spec = {}
    for name, extra in overrides.items():
        options = _recipe(name)
        assert options.pop("weight") == 1.0
        spec[name] = {**options, **extra}
    w = WeightedReward.from_config(spec)
    assert w.rewards["pickscore"].scale == pytest.approx(1 / 26)
    assert w.rewards["clipscore"].scale == 100.0
    assert w.rewards["step_aware_pickscore"].scale == 1.0 and w.rewards["step_aware_pickscore"].default_timestep == 0
    for name in ("hpsv2", "imagereward"):  # cannot build here: every recipe key is a constructor option
        options = _recipe(name)
        options.pop("weight")
        params = inspect.signature(REWARDS[name].__init__).parameters
        assert set(options) <= set(params), name
