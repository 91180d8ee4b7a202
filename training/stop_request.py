"""Stop requests (SIGTERM from a scheduler, Ctrl-C): every rank finishes the current step, then the run writes
a snapshot and its training state and returns."""

import signal

import torch

from torch_utils import distributed as dist

#----------------------------------------------------------------------------

class StopRequest:
    def __init__(self):
        self.requested = False
        self._previous = dict()

    def install(self):
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError: # not the main thread: signals stay with the caller
            self._previous.clear()

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, _frame):
        # No printing here: the signal may arrive in the middle of a print.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt # second Ctrl-C: abort now
        self.requested = True

_stop_group = None # gloo process group for the stop flag, so that checking it never waits for the GPU

def agree_to_stop(local_request):
    """True on every rank when any rank was asked to stop (a collective call under DDP)."""
    global _stop_group
    if dist.get_world_size() == 1:
        return bool(local_request)
    if _stop_group is None:
        is_gloo = torch.distributed.get_backend() == 'gloo'
        _stop_group = torch.distributed.group.WORLD if is_gloo else torch.distributed.new_group(backend='gloo')
    flag = torch.tensor([1.0 if local_request else 0.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=_stop_group)
    return bool(flag.item() > 0)

#----------------------------------------------------------------------------
