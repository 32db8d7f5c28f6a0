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
