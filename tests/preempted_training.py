"""Run training_loop on a tiny DDPM++ with a loss that sends its own process
SIGTERM during a chosen call: a preemption at an exact training step.

    python tests/preempted_training.py RUN_DIR DATA STOP_AT_CALL [STATE_PT SNAPSHOT_PKL]

STOP_AT_CALL 0 never stops. With STATE_PT and SNAPSHOT_PKL, the run resumes from them.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training import loss, training_loop # pylint: disable=wrong-import-position

class EDMLossStoppingAt(loss.EDMLoss):
    """EDMLoss that requests a stop (a real SIGTERM) during its `stop_at_call`-th call."""
    def __init__(self, stop_at_call=0, **kwargs):
        super().__init__(**kwargs)
        self.stop_at_call = stop_at_call
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(*args, **kwargs)

def main(run_dir, data, stop_at_call, state=None, snapshot=None):
    sys.modules['preempted_training'] = sys.modules[__name__] # the loss class by name, as training_loop builds it
    training_loop.training_loop(
        run_dir=run_dir, seed=0, batch_size=32, total_kimg=2, kimg_per_tick=1, snapshot_ticks=1, state_dump_ticks=1,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=False, xflip=False, cache=True),
        data_loader_kwargs=dict(class_name='torch.utils.data.DataLoader', num_workers=0),
        network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
                            encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                            model_channels=16, channel_mult=[1, 2], dropout=0.13),
        loss_kwargs=dict(class_name='preempted_training.EDMLossStoppingAt', stop_at_call=stop_at_call),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8),
        resume_state_dump=state, resume_pkl=snapshot, device='cpu')

if __name__ == '__main__':
    args = sys.argv[1:]
    main(args[0], args[1], int(args[2]), *args[3:])
