"""The distributed K-repeat prompt sampler."""

from collections import Counter

import pytest

from alignrl.errors import ConfigError
from alignrl.training.sampler import KRepeatPromptSampler


def _all_ranks(world, **kw):
    return [KRepeatPromptSampler(world_size=world, rank=r, **kw) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_group_complete_and_spread(world):
    samplers = _all_ranks(world, num_prompts=50, groups_per_iteration=8, group_size=6, seed=3)
    for it in range(5):
        per_rank = [s.rank_slots(it) for s in samplers]
        assert all(len(p) == 48 // world for p in per_rank)
        everything = [slot for p in per_rank for slot in p]
        counts = Counter(slot.prompt_id for slot in everything)
        assert len(counts) == 8 and set(counts.values()) == {6}  # exactly K per group, no drift
        assert sorted(s.global_index for s in everything) == list(range(48))  # no duplicates
        if world > 1:
            ranks_per_group = {pid: {r for r, p in enumerate(per_rank) for s in p if s.prompt_id == pid}
                               for pid in counts}
            assert max(len(v) for v in ranks_per_group.values()) > 1  # groups spread over ranks


def test_deterministic_and_independent_of_world_size():
    one = KRepeatPromptSampler(num_prompts=20, groups_per_iteration=4, group_size=4, seed=1)
    again = KRepeatPromptSampler(num_prompts=20, groups_per_iteration=4, group_size=4, seed=1)
    assert one.rank_slots(7) == again.rank_slots(7)
    two = _all_ranks(2, num_prompts=20, groups_per_iteration=4, group_size=4, seed=1)
    assert two[0].rank_slots(7) + two[1].rank_slots(7) == one.rank_slots(7)
    other_seed = KRepeatPromptSampler(num_prompts=20, groups_per_iteration=4, group_size=4, seed=2)
    assert other_seed.rank_slots(7) != one.rank_slots(7)
    assert one.rank_slots(8) != one.rank_slots(7)


def test_prompts_vary_across_iterations():
    s = KRepeatPromptSampler(num_prompts=100, groups_per_iteration=5, group_size=2, seed=0)
    seen = {slot.prompt_id for it in range(40) for slot in s.rank_slots(it)}
    assert len(seen) > 80


def test_bad_arithmetic_is_a_config_error():
    with pytest.raises(ConfigError, match="exceeds"):
        KRepeatPromptSampler(num_prompts=3, groups_per_iteration=4, group_size=2)
    with pytest.raises(ConfigError, match="world size"):
        KRepeatPromptSampler(num_prompts=30, groups_per_iteration=3, group_size=3, world_size=2)


def test_resume_check_rejects_changed_sampler():
    s = KRepeatPromptSampler(num_prompts=20, groups_per_iteration=4, group_size=4, seed=1)
    state = s.state_dict()
    KRepeatPromptSampler(num_prompts=20, groups_per_iteration=4, group_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="group_size"):
        KRepeatPromptSampler(num_prompts=20, groups_per_iteration=4, group_size=2, seed=1).load_state_dict(state)


def test_balance_spreads_groups_over_labels_not_prompts():
    """ShapeWorld's training set: 360 position prompts, 3 single-object ones. Uniform over prompts trains
    position two thirds of the time; balanced by tag, every tag gets the same share of the groups."""
    from alignrl.data import PromptSet
    from alignrl.shapes.world import TAGS
    from alignrl.training.sampler import balance_strata

    train = PromptSet.load("builtin:shapes_train", "data.train")
    strata = balance_strata(train, "tag")
    plain = KRepeatPromptSampler(num_prompts=len(train), groups_per_iteration=4, group_size=8, seed=0)
    samplers = _all_ranks(2, num_prompts=len(train), groups_per_iteration=4, group_size=8, seed=0, strata=strata)
    tags, plain_tags = Counter(), Counter()
    for it in range(300):
        slots = samplers[0].rank_slots(it) + samplers[1].rank_slots(it)
        counts = Counter(s.prompt_id for s in slots)
        assert len(counts) == 4 and set(counts.values()) == {8}  # complete groups of distinct prompts
        tags.update(strata[p] for p in counts)
        plain_tags.update(strata[s.prompt_id] for s in plain.rank_slots(it)[::8])
        assert len({strata[p] for p in counts}) == 4  # 4 groups, 4 different tags in one iteration
    assert set(tags) == set(TAGS) and max(tags.values()) - min(tags.values()) <= 0.25 * 200
    assert plain_tags["position"] > 0.5 * sum(plain_tags.values())  # what balancing corrects
    one = KRepeatPromptSampler(num_prompts=len(train), groups_per_iteration=4, group_size=8, seed=0, strata=strata)
    assert one.rank_slots(5) == samplers[0].rank_slots(5) + samplers[1].rank_slots(5)


def test_balance_errors_name_the_fix():
    from alignrl.data import PromptSet
    from alignrl.training.sampler import balance_strata

    with pytest.raises(ConfigError, match="single_object has 3"):
        KRepeatPromptSampler(num_prompts=9, groups_per_iteration=8, group_size=2,
                             strata=("single_object",) * 3 + ("position",) * 6)
    tiny = PromptSet.load("builtin:tiny_train", "data.train")
    with pytest.raises(ConfigError, match="have no 'tag'"):
        balance_strata(tiny, "tag")
    assert balance_strata(tiny, None) is None
