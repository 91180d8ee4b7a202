"""Dynamic loss scaling for float16 training (--fp16=1).

The reference multiplies the loss by a fixed `loss_scaling` and clamps
non-finite gradients to +-1e5, so one float16 overflow feeds huge values into
Adam's moments. Here the backward pass uses a scale that halves on overflow
(the step is skipped) and doubles back, after `growth_interval` clean steps,
up to `loss_scaling`. The optimizer always sees the gradients the reference
gives it (scaled by `loss_scaling`), so a run without overflow is unchanged.

The scale, the count of clean steps and the overflow flag live on the device.
An optimizer that can skip a step by itself (fused Adam, used by the fast
paths) gets the flag, so the step never waits for the device; any other reads
the flag back once per step.
"""

import torch

#----------------------------------------------------------------------------

class DynamicLossScale:
    def __init__(self, loss_scaling, growth_interval=1000, device='cpu'):
        self.target = float(loss_scaling)       # The reference's fixed scale, and the ceiling.
        self.growth_interval = growth_interval  # Clean steps before doubling towards the target.
        self.scale = torch.full([], self.target, dtype=torch.float32, device=device) # The scale of the next backward pass.
        self.clean_steps = torch.zeros([], dtype=torch.int64, device=device)

    def unscale(self, params):
        """After the backward pass: rescale the gradients to the target scale (a skipped step discards them) and
        return the overflow flag, 1.0 when any gradient is not finite before or after, as a tensor on the device."""
        grads = [p.grad for p in params if p.grad is not None]
        found_inf = torch.zeros([], device=self.scale.device)
        if not grads:
            return found_inf
        factor = self.target / self.scale
        try: # fused passes over all gradients: check and rescale, then check what the rescaling overflowed
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, factor)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones_like(factor))
        except (RuntimeError, NotImplementedError, AttributeError): # older builds lack it for this device or dtype
            torch._foreach_mul_(grads, factor)
            found_inf = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float()
        return found_inf

    def update(self, found_inf):
        """Halve the scale after an overflow; double it, up to the target, after `growth_interval` clean steps."""
        clean_steps = (self.clean_steps + 1) * (found_inf == 0)
        grow = (clean_steps >= self.growth_interval) & (self.scale < self.target)
        self.scale = torch.where(found_inf != 0, self.scale / 2, torch.where(grow, (self.scale * 2).clamp(max=self.target), self.scale))
        self.clean_steps = torch.where(grow, 0, clean_steps)

    def step(self, optimizer, params):
        """Unscale, step the optimizer unless a gradient overflowed, update the scale. Returns the overflow flag."""
        found_inf = self.unscale(params)
        if getattr(optimizer, '_step_supports_amp_scaling', False): # fused Adam skips the step on the device
            optimizer.found_inf = found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif found_inf.item() == 0:
            optimizer.step()
        self.update(found_inf)
        return found_inf

    def stalled(self, scale):
        """True when `scale`, the scale as read back, has halved so far below the target (2^24 times) that the
        gradients are not finite at any scale, so every step is skipped: the network or data hold non-finite values."""
        return scale < self.target * 2**-24

    def state_dict(self):
        return dict(scale=float(self.scale), clean_steps=int(self.clean_steps))

    def load_state_dict(self, state):
        self.scale = torch.full([], float(state['scale']), dtype=torch.float32, device=self.scale.device)
        self.clean_steps = torch.full([], int(state['clean_steps']), dtype=torch.int64, device=self.scale.device)

#----------------------------------------------------------------------------
