"""Dynamic loss scaling of float16 training: a step whose gradients overflow is
skipped and the scale halves; clean steps give the optimizer the gradients of
the reference's fixed scale, and the scale grows back to it. (A whole run:
tests/test_train.py.)"""

import torch

from training.loss_scale import DynamicLossScale

def params_with_grads(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params

def test_overflow_skips_and_halves_then_grows_back():
    scaler = DynamicLossScale(loss_scaling=64, growth_interval=2)
    assert not scaler.unscale_or_skip(params_with_grads(torch.ones(3), torch.tensor([1.0, float('inf')])))
    assert not scaler.unscale_or_skip(params_with_grads(torch.tensor([float('nan')])))
    assert scaler.scale == 16
    params = params_with_grads(torch.tensor([1.0, -2.0]), torch.tensor([0.5]))
    assert scaler.unscale_or_skip(params) # computed at scale 16: the optimizer gets them at 64, as with the fixed scale
    assert torch.equal(params[0].grad, torch.tensor([4.0, -8.0])) and torch.equal(params[1].grad, torch.tensor([2.0]))
    assert scaler.unscale_or_skip(params_with_grads(torch.ones(1)))
    assert scaler.scale == 32 # doubled after 2 clean steps
    for _ in range(4):
        assert scaler.unscale_or_skip(params_with_grads(torch.ones(1)))
    assert scaler.scale == 64 # and never above the fixed scale
    restored = DynamicLossScale(loss_scaling=64)
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.clean_steps) == (scaler.scale, scaler.clean_steps)
