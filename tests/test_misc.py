"""torch_utils.misc: the infinite data sampler and weight copying by name."""

import itertools

import numpy as np
import pytest
import torch

from torch_utils import misc


def _take(sampler, n):
    return [int(i) for i in itertools.islice(iter(sampler), n)]


def test_infinite_sampler_covers_the_dataset_and_splits_over_ranks():
    dataset = list(range(50))
    whole = _take(misc.InfiniteSampler(dataset, seed=1), 400)
    assert sorted(whole[:50]) != whole[:50] # shuffled
    assert set(whole[:120]) == set(dataset) # every image soon appears
    ranks = [_take(misc.InfiniteSampler(dataset, rank=r, num_replicas=2, seed=1), 200) for r in range(2)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2] # each rank takes every other position


@pytest.mark.parametrize('rank', [0, 1])
def test_infinite_sampler_resumes_exactly(rank):
    dataset = list(range(37))
    make = lambda **kwargs: misc.InfiniteSampler(dataset, rank=rank, num_replicas=2, seed=3, **kwargs)
    reference = _take(make(), 300)
    # Skipping by replay, and jumping from a saved state (taken earlier than the resume point).
    assert _take(make(start_idx=100), 250) == reference[50:]
    state = make().state_at(80)
    state = make().state_at(130, state) # replayed onwards from the earlier state
    assert state['idx'] == 130
    assert _take(make(start_idx=130, start_state=state), 235) == reference[65:]
    with pytest.raises(ValueError):
        _take(misc.InfiniteSampler(list(range(10)), seed=3, start_idx=130, start_state=state), 1)


def test_copy_params_and_buffers_by_name():
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    assert torch.equal(src.weight, dst.weight) and torch.equal(src.bias, dst.bias)
    with pytest.raises(ValueError, match='bias'):
        misc.copy_params_and_buffers(torch.nn.Linear(3, 2, bias=False), dst, require_all=True)
    with pytest.raises(ValueError, match='shape'):
        misc.copy_params_and_buffers(torch.nn.Linear(4, 2), dst)


def test_constant_is_cached_per_value_and_device():
    a = misc.constant(np.arange(3), dtype=torch.float32)
    assert a is misc.constant(np.arange(3), dtype=torch.float32)
    assert a is not misc.constant(np.arange(3), dtype=torch.float64)
    assert misc.constant(1.5, shape=[2, 2]).shape == (2, 2)


def test_device_choice_defaults_to_cuda_when_available():
    assert misc.choose_device('cpu').type == 'cpu'
    assert misc.choose_device(None).type == ('cuda' if torch.cuda.is_available() else 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='--device=cpu'):
            misc.choose_device('cuda')
