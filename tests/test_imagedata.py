"""Offline image datasets (pairs, ranked lists, labels, captions) and the dataset sampler."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from alignrl.errors import ConfigError
from alignrl.imagedata import ImageDataset, load_image_tensor
from alignrl.training.sampler import DatasetSampler


def _png(path, colour=(255, 0, 0), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_pairs_in_both_layouts_winner_first_ties_dropped(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", (0, 0, 255))
    f = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a red square", "winner": a, "loser": b, "winner_score": 0.9, "loser_score": 0.1},
        {"caption": "a blue square", "image_0": a, "image_1": b, "label_0": 0, "score_0": 0.2, "score_1": 0.7},
        {"caption": "a tie", "image_0": a, "image_1": b, "label_0": 0.5},
    ])
    ds = ImageDataset.load(f, "pairs")
    assert len(ds) == 2 and ds.dropped_ties == 1
    assert [p.name for p in ds.rows[0].images] == ["a.png", "b.png"] and ds.rows[0].scores == [0.9, 0.1]
    assert [p.name for p in ds.rows[1].images] == ["b.png", "a.png"] and ds.rows[1].scores == [0.7, 0.2]
    stats = ds.validate()
    assert stats == {"rows": 2, "images": 4, "dropped_ties": 1, "below_min_score": 0, "sizes": {"8x6": 4}}
    with pytest.raises(ConfigError, match=r"pairs.jsonl:3: a tie .* drop_ties=false"):
        ImageDataset.load(f, "pairs", drop_ties=False)


def test_lists_labels_captions(tmp_path):
    names = [_png(tmp_path / f"{i}.png") for i in range(3)]
    lists = ImageDataset.load(_jsonl(tmp_path / "l.jsonl", [{"prompt": "p", "images": names, "scores": [1, 3, 2]}]),
                              "lists")
    assert lists.rows[0].scores == [1.0, 3.0, 2.0] and len(lists.rows[0].images) == 3
    labels = ImageDataset.load(_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "image": names[0], "label": True},
                                                             {"prompt": "q", "image": names[1], "label": 0}]), "labels")
    assert [r.label for r in labels.rows] == [1.0, 0.0] and labels.validate()["desirable"] == 1
    caps = ImageDataset.load(_jsonl(tmp_path / "c.jsonl", [{"caption": "c", "image": names[2]}]), "captions")
    assert caps.prompts == ["c"]


@pytest.mark.parametrize("kind, row, message", [
    ("pairs", {"winner": "a.png", "loser": "a.png"}, r":1: the row has no prompt"),
    ("pairs", {"caption": "c", "image_0": "a.png", "image_1": "a.png", "label_0": 2}, r"\"label_0\" must be 1"),
    ("pairs", {"caption": "c", "image_0": "a.png"}, r"needs \"winner\"/\"loser\" or \"image_0\""),
    ("lists", {"prompt": "p", "images": ["a.png"], "scores": [1]}, r"two or more image paths"),
    ("lists", {"prompt": "p", "images": ["a.png", "a.png"], "scores": [1]}, r"one number per image \(2\)"),
    ("lists", {"prompt": "p", "images": ["a.png", "a.png"], "scores": [1, "x"]}, r"\"scores\" must be a finite"),
    ("labels", {"prompt": "p", "image": "a.png", "label": 0.5}, r"\"label\" must be 1 \(desirable\) or 0"),
    ("labels", {"prompt": "p", "image": "a.png"}, r"no \"label\""),
    ("captions", {"prompt": "", "image": "a.png"}, r"\"prompt\" must be a non-empty string"),
    ("captions", {"prompt": "p"}, r"no \"image\" image path"),
])
def test_bad_rows_are_one_line_errors_naming_the_line(tmp_path, kind, row, message):
    _png(tmp_path / "a.png")
    f = _jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(ConfigError, match=message) as e:
        ImageDataset.load(f, kind)
    assert "\n" not in str(e.value) and "d.jsonl:1" in str(e.value)


def test_validation_finds_missing_and_unreadable_images(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "image": "ok.png"}, {"prompt": "q", "image": "gone.png"}])
    ds = ImageDataset.load(f, "captions")  # rows parse; images are opened by validate()
    with pytest.raises(ConfigError, match=r"d.jsonl:2: image '.*gone.png' does not exist"):
        ds.validate()
    f = _jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "image": "broken.png"}])
    with pytest.raises(ConfigError, match=r"e.jsonl:1: image '.*broken.png' cannot be read as an image"):
        ImageDataset.load(f, "captions").validate()
    with pytest.raises(ConfigError, match=r"data.offline.kind='triples' is not known"):
        ImageDataset.load(f, "triples")
    with pytest.raises(ConfigError, match=r"data.offline.path='.*nope.jsonl' is not a file"):
        ImageDataset.load(tmp_path / "nope.jsonl", "captions")


def test_images_load_resized_cropped_in_the_vae_range(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (34, 0, 40, 20))  # a blue band on the right, cropped away at 16 px
    img.save(tmp_path / "x.png")
    x = load_image_tensor(tmp_path / "x.png", 16)
    assert x.shape == (3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.allclose(x[0].numpy(), 1.0, atol=0.05) and np.allclose(x[2].numpy(), -1.0, atol=0.05)


def test_dataset_sampler_covers_each_epoch_and_is_a_function_of_the_iteration():
    s = DatasetSampler(num_rows=10, rows_per_iteration=4, seed=3)
    stream = [r for it in range(5) for r in s.global_rows(it)]  # 20 rows = 2 epochs
    assert Counter(stream[:10]) == Counter(range(10)) and Counter(stream[10:]) == Counter(range(10))
    assert stream[:10] != stream[10:]  # each epoch has its own order
    again = DatasetSampler(num_rows=10, rows_per_iteration=4, seed=3)
    assert again.global_rows(3) == s.global_rows(3)  # resume mid-epoch: the same rows, no state needed
    two = [DatasetSampler(10, 4, world_size=2, rank=r, seed=3) for r in (0, 1)]
    joined = [slot.prompt_id for r in two for slot in r.rank_rows(2)]
    assert joined == s.global_rows(2) and [x.global_index for x in two[1].rank_rows(2)] == [2, 3]
    assert s.epoch(4) == 2.0
    with pytest.raises(ConfigError, match="do not split over 3 processes"):
        DatasetSampler(10, 4, world_size=3)
    with pytest.raises(ConfigError, match="dataset sampler differs"):
        s.load_state_dict({"num_rows": 11, "rows_per_iteration": 4, "seed": 3})


def test_balanced_dataset_sampler_gives_every_label_the_same_share_and_reads_each_label_in_epochs():
    """data.offline.balance: 360 rows of one label and 3 of another (ShapeWorld's position vs single-object
    captions) are read alike: each iteration's shares differ by at most one row and even out over iterations,
    each label's rows come in epochs of its own, and the rows stay a pure function of (seed, iteration)."""
    strata = tuple(["position"] * 360 + ["single"] * 3 + ["colors"] * 9)
    label_of = dict(enumerate(strata))
    s = DatasetSampler(len(strata), 64, seed=5, strata=strata)
    totals = Counter()
    per_label: dict = {}
    for it in range(30):
        rows = s.global_rows(it)
        assert len(rows) == 64
        share = Counter(label_of[r] for r in rows)
        assert max(share.values()) - min(share.values()) <= 1 and set(share) == {"position", "single", "colors"}
        totals.update(share)
        for r in rows:
            per_label.setdefault(label_of[r], []).append(r)
    assert max(totals.values()) - min(totals.values()) <= 1  # 30 x 64 = 1920 rows: 640 each
    # each label reads its rows in epochs of its own: after 640 reads every row of a label was read equally often,
    # to within one (the last epoch is partial)
    for label, rows in per_label.items():
        counts = Counter(rows)
        assert len(counts) == strata.count(label) and max(counts.values()) - min(counts.values()) <= 1, label
    again = DatasetSampler(len(strata), 64, seed=5, strata=strata)
    assert again.global_rows(17) == s.global_rows(17)
    plain = DatasetSampler(len(strata), 64, seed=5)
    assert Counter(label_of[r] for r in plain.global_rows(0))["position"] > 50  # what balancing fixes
    two = [DatasetSampler(len(strata), 64, world_size=2, rank=r, seed=5, strata=strata) for r in (0, 1)]
    assert [x.prompt_id for r in two for x in r.rank_rows(4)] == s.global_rows(4)
    with pytest.raises(ConfigError, match="dataset sampler differs"):
        s.load_state_dict(plain.state_dict())  # resuming with another balance setting is refused
    with pytest.raises(ConfigError, match="3 labels do not fit in 2 rows"):
        DatasetSampler(len(strata), 2, strata=strata)


def test_label_count_is_the_running_sum_of_the_shares():
    strata = tuple("abcde"[i % 5] for i in range(40))
    s = DatasetSampler(40, 12, seed=0, strata=strata)  # 12 rows over 5 labels: 2 each and 2 extra, dealt in turn
    running = Counter()
    for it in range(13):
        for label in range(5):
            assert s.label_count(label, it) == running[label]
        rows = s.global_rows(it)
        running.update("abcde".index(strata[r]) for r in rows)


def test_balance_power_shares_rows_as_a_power_of_each_labels_size():
    """balance_power p: label shares proportional to n^p (0.5: ShapeWorld's 360 position and 3 single-object
    captions get shares in the ratio sqrt(120) = 11, not 1 or 120); the counts are running floors, the largest
    label takes the rest, every label reads its rows in epochs, and the rows are a pure function of the iteration."""
    import math

    strata = tuple(["position"] * 360 + ["single"] * 3 + ["colors"] * 9)
    label_of = dict(enumerate(strata))
    s = DatasetSampler(len(strata), 64, seed=5, strata=strata, power=0.5)
    sizes = {"colors": 9, "position": 360, "single": 3}
    share = {k: math.sqrt(n) / sum(math.sqrt(m) for m in sizes.values()) for k, n in sizes.items()}
    totals = Counter()
    names = sorted(sizes)  # labels are sorted by their text
    for it in range(40):
        for i, name in enumerate(names):
            assert s.label_count(i, it) == totals[name]
            if name != "position":
                assert totals[name] == math.floor(it * 64 * share[name])
        rows = s.global_rows(it)
        assert len(rows) == 64
        totals.update(label_of[r] for r in rows)
    for name in names:  # a floor loses under a row; the largest label gains what the other two lose
        assert abs(totals[name] - 40 * 64 * share[name]) < (2 if name == "position" else 1), name
    assert DatasetSampler(len(strata), 64, seed=5, strata=strata, power=0.5).global_rows(23) == s.global_rows(23)
    one = DatasetSampler(len(strata), 64, seed=5, strata=strata, power=1.0)
    assert abs(one.label_count(names.index("position"), 10) - 10 * 64 * 360 / 372) < 2  # p = 1: the rows' mix
    with pytest.raises(ConfigError, match="dataset sampler differs"):
        s.load_state_dict(DatasetSampler(len(strata), 64, seed=5, strata=strata).state_dict())
    with pytest.raises(ConfigError, match=r"balance_power=2: give a number in \[0, 1\]"):
        DatasetSampler(len(strata), 64, strata=strata, power=2)
    with pytest.raises(ConfigError, match="balance_power=0.5 needs data.offline.balance"):
        DatasetSampler(len(strata), 64, power=0.5)
    even = tuple("a" * 26 + "b" * 25 + "c" * 25 + "d" * 25)  # 5 rows: the three smaller labels' running floors
    with pytest.raises(ConfigError, match="shares do not fit in 5 rows"):  # may each step by 2, more than 5
        DatasetSampler(len(even), 5, strata=even, power=1.0)


def test_a_row_without_the_balance_field_is_one_line(tmp_path):
    a = _png(tmp_path / "a.png")
    f = _jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "image": a, "tag": "colors"}, {"prompt": "q", "image": a}])
    assert ImageDataset.load(f, "captions", balance=None).rows[0].stratum is None
    with pytest.raises(ConfigError, match=r"c.jsonl:2: data.offline.balance=tag, but the row has no \"tag\""):
        ImageDataset.load(f, "captions", balance="tag")
    ds = ImageDataset.load(_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "image": a, "tag": "colors"}]), "captions",
                           balance="tag")
    assert ds.rows[0].stratum == "colors"


def test_min_score_leaves_out_captions_scored_below_it(tmp_path):
    a = _png(tmp_path / "a.png")
    rows = [{"prompt": "p", "image": a, "score": 1.0}, {"prompt": "q", "image": a, "score": 0.67},
            {"prompt": "r", "image": a, "score": 0.33}, {"prompt": "s", "image": a, "score": 1}]
    f = _jsonl(tmp_path / "c.jsonl", rows)
    assert len(ImageDataset.load(f, "captions")) == 4  # unset: every row
    ds = ImageDataset.load(f, "captions", min_score=1.0)
    assert ds.prompts == ["p", "s"] and ds.below_min_score == 2 and ds.validate()["below_min_score"] == 2
    assert ImageDataset.load(f, "captions", min_score=0.5).prompts == ["p", "q", "s"]
    with pytest.raises(ConfigError, match=r"holds no usable captions rows \(4 scored below data.offline.min_score=2"):
        ImageDataset.load(f, "captions", min_score=2)
    g = _jsonl(tmp_path / "d.jsonl", [rows[0], {"prompt": "t", "image": a}])
    with pytest.raises(ConfigError, match=r"d.jsonl:2: data.offline.min_score=1.0, but the row has no \"score\""):
        ImageDataset.load(g, "captions", min_score=1.0)
    with pytest.raises(ConfigError, match=r"min_score applies to captions datasets"):
        ImageDataset.load(f, "labels", min_score=1.0)
    with pytest.raises(ConfigError, match=r"min_score='high': give a number"):
        ImageDataset.load(f, "captions", min_score="high")


@pytest.mark.parametrize("family", ["sd3", "flux", "shapes"])
def test_encode_gives_latents_of_the_sampling_shape_and_the_cache_reuses_them(tmp_path, family):
    import torch

    from alignrl.backbones.flux import FluxBackbone
    from alignrl.backbones.sd3 import SD3Backbone
    from alignrl.imagedata import LatentCache
    from alignrl.shapes.model import ShapesBackbone

    build = {"sd3": lambda: SD3Backbone.tiny(resolution=32, max_sequence_length=8),
             "flux": lambda: FluxBackbone.tiny(resolution=32, max_sequence_length=8),
             "shapes": lambda: ShapesBackbone.pretrained(resolution=32)}[family]
    backbone = build()
    images = torch.rand(2, 3, 32, 32)
    z = backbone.encode(images)
    assert z.shape == (2, *backbone.latent_shape())
    assert torch.equal(z, backbone.encode(images))  # the posterior mean: deterministic
    assert backbone.decode(z).shape == images.shape
    if family == "shapes":
        torch.testing.assert_close(backbone.decode(z), images)  # pixel space: exact inverse
    with pytest.raises(ValueError, match="resize them first|samples at 32px"):
        backbone.encode(torch.rand(1, 3, 16, 16))
    paths = [tmp_path / _png(tmp_path / f"{i}.png", (60 * i, 0, 0), size=(32, 32)) for i in range(3)]
    cache = LatentCache(tmp_path / "cache", backbone)
    first = cache.latents(paths)
    again = LatentCache(tmp_path / "cache", backbone)
    assert torch.equal(again.latents(paths), first) and (again.hits, again.misses) == (3, 0)
    _png(paths[0], (0, 255, 0), size=(32, 32))  # the image changed: encoded again
    import os
    os.utime(paths[0], ns=(1, 1))
    third = LatentCache(tmp_path / "cache", backbone)
    fresh = third.latents(paths)
    assert (third.hits, third.misses) == (2, 1) and not torch.equal(fresh[0], first[0])
