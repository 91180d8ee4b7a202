"""Dynamic loss scaling for float16 training (--fp16=1).

The reference multiplies the loss by a fixed `loss_scaling` and clamps
non-finite gradients to +-1e5, so one float16 overflow feeds huge values into
Adam's moments. Here the backward pass uses a scale that halves on overflow
(the step is skipped) and doubles back, after `growth_interval` clean steps,
up to `loss_scaling`. The optimizer always sees the gradients the reference
gives it (scaled by `loss_scaling`), so a run without overflow is unchanged.
"""

import torch

#----------------------------------------------------------------------------

class DynamicLossScale:
    def __init__(self, loss_scaling, growth_interval=1000):
        self.target = float(loss_scaling)       # The reference's fixed scale, and the ceiling.
        self.scale = float(loss_scaling)        # The scale of the next backward pass.
        self.growth_interval = growth_interval  # Clean steps before doubling towards the target.
        self.clean_steps = 0

    def unscale_or_skip(self, params):
        """After the backward pass: True, with the gradients rescaled to the target scale, when they are all
        finite; else False (skip the step), and the scale halves. Reads one flag back from the device."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        found_inf = torch.zeros([1], device=grads[0].device)
        factor = torch.full([1], self.target / self.scale, device=grads[0].device)
        try: # one fused pass over all gradients: check, and rescale (which a skipped step discards)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, factor)
        except (RuntimeError, NotImplementedError, AttributeError): # older builds lack it for this device or dtype
            found_inf = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float()
            torch._foreach_mul_(grads, self.target / self.scale)
        if found_inf.item() != 0:
            self.scale /= 2
            self.clean_steps = 0
            return False
        self.clean_steps += 1
        if self.scale < self.target and self.clean_steps >= self.growth_interval:
            self.scale = min(self.scale * 2, self.target)
            self.clean_steps = 0
        return True

    def state_dict(self):
        return dict(scale=self.scale, clean_steps=self.clean_steps)

    def load_state_dict(self, state):
        self.scale = float(state['scale'])
        self.clean_steps = int(state['clean_steps'])

#----------------------------------------------------------------------------
