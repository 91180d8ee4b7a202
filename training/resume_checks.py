"""Checks on the values of a training state before a run resumes from it:
counters, the data order and the random generator states must be of the
kinds and sizes that training writes, so that a damaged or hostile file fails
in one line before any step (a huge sampler_idx would otherwise replay the
data order for ever)."""

import random

import numpy as np
import torch

#----------------------------------------------------------------------------

MAX_NIMG = 1 << 50      # Images of training that a state may record.

def _int(state, key, path, low=0, high=MAX_NIMG):
    value = state.get(key)
    if type(value) is not int or not low <= value <= high: # pylint: disable=unidiomatic-typecheck
        shown = repr(value) if isinstance(value, (int, float, str, type(None))) and len(repr(value)) < 40 else type(value).__name__
        raise ValueError(f'{path}: {key} is {shown}, not an integer in [{low}, {high}]')
    return value

def _check_numpy_state(value, what, path):
    try:
        np.random.RandomState().set_state(value)
    except Exception as err: # pylint: disable=broad-exception-caught
        raise ValueError(f'{path}: {what} is not a numpy random state ({type(err).__name__})') from None
    if value[1].dtype != np.uint32 or value[1].shape != (624,):
        raise ValueError(f'{path}: {what} is not a numpy random state')

def _check_rng_state(rng, path):
    if not isinstance(rng, dict) or not {'torch', 'numpy', 'python'} <= set(rng):
        raise ValueError(f'{path}: rng_states holds a generator state without its torch, numpy or python entry')
    try:
        t = rng['torch']
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
            raise TypeError('the torch state')
        torch.Generator().set_state(t)
        random.Random().setstate(rng['python'])
        cuda = rng.get('cuda')
        if cuda is not None and (not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8 or cuda.numel() > 1 << 16):
            raise TypeError('the cuda state')
    except Exception as err: # pylint: disable=broad-exception-caught
        raise ValueError(f'{path}: rng_states holds a generator state that training does not write ({type(err).__name__}: {err})'[:300]) from None
    _check_numpy_state(rng['numpy'], 'the numpy state in rng_states', path)

def check_state(state, path):
    """Raise ValueError naming `path` unless the state's counters, data order and generator states are sound:
    0 <= tick_start_nimg, sampler_idx <= cur_nimg; a data order that is a list of image indices."""
    if 'cur_nimg' not in state:
        return state # the reference's layout: progress from the file name, a fresh data order
    cur_nimg = _int(state, 'cur_nimg', path)
    highs = dict(cur_tick=cur_nimg + 1, tick_start_nimg=cur_nimg, sampler_seed=(1 << 32) - 1)
    for key, high in highs.items():
        if key in state:
            _int(state, key, path, high=high)
    for key in ('batch_size', 'world_size'):
        if state.get(key) is not None:
            _int(state, key, path, low=1, high=1 << 24)
    sampler_idx = _int(state, 'sampler_idx', path, high=cur_nimg) if 'sampler_idx' in state else cur_nimg
    sampler_state = state.get('sampler_state')
    if sampler_state is not None:
        if not isinstance(sampler_state, dict) or not {'idx', 'order', 'rnd_state'} <= set(sampler_state):
            raise ValueError(f'{path}: sampler_state lacks its idx, order or rnd_state')
        _int(sampler_state, 'idx', path, high=sampler_idx)
        order = sampler_state['order']
        if not isinstance(order, np.ndarray) or order.ndim != 1 or order.dtype.kind not in 'iu' or order.size > 1 << 31 \
                or (order.size and (order.min() < 0 or order.max() >= order.size)):
            raise ValueError(f'{path}: sampler_state.order is not a list of image indices')
        _check_numpy_state(sampler_state['rnd_state'], 'sampler_state.rnd_state', path)
    rng_states = state.get('rng_states')
    if rng_states is not None:
        if not isinstance(rng_states, list) or len(rng_states) > 1 << 16:
            raise ValueError(f'{path}: rng_states is not a list of random generator states')
        for rng in rng_states:
            _check_rng_state(rng, path)
    loss_scale = state.get('loss_scale')
    if loss_scale is not None and (not isinstance(loss_scale, dict) or type(loss_scale.get('scale')) not in (int, float)
                                   or type(loss_scale.get('clean_steps')) is not int): # pylint: disable=unidiomatic-typecheck
        raise ValueError(f'{path}: loss_scale is not the state of a loss scale (scale, clean_steps)')
    return state

#----------------------------------------------------------------------------
