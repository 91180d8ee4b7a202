"""Dynamic loss scaling of float16 training: a step whose gradients overflow is
skipped and the scale halves; clean steps give the optimizer the gradients of
the reference's fixed scale, and the scale grows back to it. Fused Adam skips
on the device, other optimizers after reading the flag; both give the same
run. (A whole run: tests/test_train.py.)"""

import pytest
import torch

from training.loss_scale import DynamicLossScale

def make_optimizer(kind, params):
    if kind == 'sgd':
        return torch.optim.SGD(params, lr=1)
    try:
        return torch.optim.Adam(params, lr=0.1, fused=(kind == 'fused-adam'))
    except RuntimeError as err: # PyTorch before 2.4 has fused Adam on CUDA only
        pytest.skip(f'{kind} on the CPU: {err}')

def set_grads(params, *grads):
    for p, g in zip(params, grads):
        p.grad = torch.as_tensor(g, dtype=torch.float32).clone()

def test_unscale_rescales_to_the_fixed_scale_and_flags_overflow():
    scaler = DynamicLossScale(loss_scaling=64)
    scaler.scale = torch.tensor(16.0) # the gradients were computed at 16: the optimizer gets them at 64, as with the fixed scale
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    set_grads(params, [1.0, -2.0], [0.5])
    assert scaler.unscale(params) == 0
    assert torch.equal(params[0].grad, torch.tensor([4.0, -8.0])) and torch.equal(params[1].grad, torch.tensor([2.0]))
    set_grads(params, [1.0, float('nan')], [0.5])
    assert scaler.unscale(params) == 1

def test_gradients_that_the_rescaling_overflows_are_flagged():
    scaler = DynamicLossScale(loss_scaling=1e38)
    scaler.scale = torch.tensor(1e8) # finite at 1e8, infinite at 1e38: Adam must not get them
    params = [torch.nn.Parameter(torch.zeros(2))]
    set_grads(params, [1.0, 1e9])
    assert scaler.unscale(params) == 1

@pytest.mark.parametrize('kind', ['sgd', 'adam', 'fused-adam'])
def test_overflow_skips_and_halves_then_grows_back(kind):
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    optimizer = make_optimizer(kind, params)
    scaler = DynamicLossScale(loss_scaling=64, growth_interval=2)
    for bad in [float('inf'), float('nan')]:
        set_grads(params, [1.0, bad])
        assert scaler.step(optimizer, params) == 1
    assert torch.equal(params[0].detach(), torch.tensor([1.0, 2.0])) # skipped: the weights and Adam's state are untouched
    assert all(float(v.abs().sum()) == 0 for v in optimizer.state[params[0]].values())
    assert scaler.state_dict() == dict(scale=16.0, clean_steps=0)
    set_grads(params, [1.0, 1.0])
    assert scaler.step(optimizer, params) == 0
    assert not torch.equal(params[0].detach(), torch.tensor([1.0, 2.0]))
    set_grads(params, [1.0, 1.0])
    scaler.step(optimizer, params)
    assert scaler.state_dict() == dict(scale=32.0, clean_steps=0) # doubled after 2 clean steps
    for _ in range(5):
        set_grads(params, [1.0, 1.0])
        scaler.step(optimizer, params)
    assert scaler.state_dict() == dict(scale=64.0, clean_steps=3) # and never above the fixed scale
    restored = DynamicLossScale(loss_scaling=64)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()

def test_fused_adam_skips_on_the_device_like_adam_after_reading_the_flag():
    grads = [[0.5, -1.0], [1.0, float('inf')], [2.0, 0.25], [float('nan'), 1.0], [-0.5, 0.5]]
    results = []
    for kind in ['adam', 'fused-adam']:
        params = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
        optimizer = make_optimizer(kind, params)
        scaler = DynamicLossScale(loss_scaling=8, growth_interval=1)
        flags = []
        for g in grads:
            set_grads(params, g)
            flags.append(float(scaler.step(optimizer, params)))
        results.append((flags, params[0].detach().clone(), float(optimizer.state[params[0]]['step']), scaler.state_dict()))
    (flags_a, weights_a, steps_a, state_a), (flags_f, weights_f, steps_f, state_f) = results
    assert flags_a == flags_f == [0, 1, 0, 1, 0]
    assert steps_a == steps_f == 3
    assert state_a == state_f
    torch.testing.assert_close(weights_f, weights_a, rtol=1e-6, atol=1e-6)
