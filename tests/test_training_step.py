"""TrainingStep, the one training step that the loop (and bench/bench.py)
runs: accumulation rounds are an implementation detail of the step, and the
EMA follows its half-life formula."""

import copy

import pytest
import torch

from conftest import make_tiny_net

from training.training_loop import TrainingStep

class DenoisingLossAtSigmaOne:
    """The denoising error at sigma = 1 of the clean images (no random draws), per pixel."""
    def __call__(self, net, images, labels, augment_pipe=None):
        sigma = torch.ones([images.shape[0], 1, 1, 1])
        return (net(images, sigma, labels) - images) ** 2

def _step(num_accumulation_rounds, ema_halflife_kimg=0.016):
    net = make_tiny_net(label_dim=0).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2) # linear in the gradient: rounding stays small
    return TrainingStep(net=net, ema=ema, loss_fn=DenoisingLossAtSigmaOne(), optimizer=optimizer, batch_size=8, lr=1e-2,
                        num_accumulation_rounds=num_accumulation_rounds, ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=None)

def _batches(images, num_rounds):
    chunks = iter(images.chunk(num_rounds))
    return lambda: (next(chunks), torch.zeros([len(images) // num_rounds, 0]))

def test_accumulation_rounds_give_the_same_step():
    images = torch.rand([8, 3, 8, 8], generator=torch.Generator().manual_seed(1)) * 2 - 1
    results = []
    for rounds in (1, 2, 4): # the per-image losses are summed over rounds, scaled by 1/8 each time
        step = _step(rounds)
        before = [p.detach().clone() for p in step.net.parameters()]
        step(_batches(images, rounds), cur_nimg=1000)
        results.append((before, [p.detach().clone() for p in step.net.parameters()], [p.clone() for p in step.ema.parameters()]))
        assert step.take_mean_loss() > 0 and step.loss_num == 0
    (before, after, ema), *others = results
    assert any(not torch.equal(a, b) for a, b in zip(before, after)) # the step moved the weights
    for _, other_after, other_ema in others:
        for a, b in zip(after, other_after):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(ema, other_ema):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

def test_ema_follows_the_half_life():
    # Half-life of 16 images with 8-image steps: beta = 0.5^(8/16), ema = beta * ema + (1 - beta) * net.
    step = _step(1, ema_halflife_kimg=0.016)
    ema_before = [p.clone() for p in step.ema.parameters()]
    step(_batches(torch.zeros([8, 3, 8, 8]), 1), cur_nimg=0)
    beta = 0.5 ** 0.5
    for e0, e1, p in zip(ema_before, step.ema.parameters(), step.net.parameters()):
        torch.testing.assert_close(e1, beta * e0 + (1 - beta) * p.detach(), rtol=1e-6, atol=1e-7)

def test_learning_rate_ramps_up():
    step = _step(1)
    step.lr_rampup_kimg = 2
    step(_batches(torch.zeros([8, 3, 8, 8]), 1), cur_nimg=500)
    assert step.optimizer.param_groups[0]['lr'] == pytest.approx(1e-2 * 500 / 2000)

@pytest.mark.parametrize('nonfinite_grad', [1e5, 0])
def test_infinite_gradients_are_clamped_as_the_recipe_says(nonfinite_grad):
    # The reference clamps an infinite gradient to +-1e5 and steps; EDM2 (training/training_loop.py passes 0 for an
    # EDM2 run) zeroes it, so that an overflowed float16 entry leaves its weight where it was. NaN becomes 0 in both.
    step = _step(1)
    step.nonfinite_grad = nonfinite_grad
    step.accumulate_gradients(_batches(torch.rand([8, 3, 8, 8]) * 2 - 1, 1))
    param = next(p for p in step.net.parameters() if p.ndim > 1)
    param.grad[0].fill_(float('inf'))
    param.grad[1].fill_(float('nan'))
    before = param.detach().clone()
    step.update_weights(cur_nimg=1000)
    lr = step.optimizer.param_groups[0]['lr'] # SGD: the weight moves by -lr times the gradient
    torch.testing.assert_close(param[0].detach(), before[0] - lr * nonfinite_grad)
    assert torch.equal(param[1].detach(), before[1])
