"""Pieces the benchmark scripts share: the repository root, the network
configurations, the redrawing of near-zero weights and the profile tables."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Configurations (those of train.py for the published models).

CONFIGS = {
    'cifar10-ddpmpp': dict(res=32, ch=3, label_dim=10, sample_batch=256, train_batch=512, net=dict(
        class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
        encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
        model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)),
    'imagenet-adm': dict(res=64, ch=3, label_dim=1000, sample_batch=64, train_batch=64, net=dict(
        class_name='training.networks.EDMPrecond', model_type='DhariwalUNet', model_channels=192,
        channel_mult=[1, 2, 3, 4], dropout=0.10)),
    # --quick: small enough for a CPU smoke test.
    'tiny-ddpmpp': dict(res=16, ch=3, label_dim=10, sample_batch=8, train_batch=8, net=dict(
        class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
        encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
        model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.13)),
    'tiny-adm': dict(res=16, ch=3, label_dim=10, sample_batch=8, train_batch=8, net=dict(
        class_name='training.networks.EDMPrecond', model_type='DhariwalUNet', model_channels=32,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.10)),
}

#----------------------------------------------------------------------------

def redraw_small_weights(module):
    """Redraw the weights initialised near zero at unit gain, so that every layer shapes the output."""
    import torch # pylint: disable=import-outside-toplevel
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim > 1 and param.abs().max() < 1e-3:
                param.normal_(0, param[0].numel() ** -0.5)

def write_profile(fn, sync, device, path):
    """Write the operations of one more run of `fn`, most device time first, as text tables:
    by name, then by name and input shapes (which shows the tensors that copies move)."""
    from torch.profiler import ProfilerActivity, profile # pylint: disable=import-outside-toplevel
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        sync()
    def table(events, row_limit):
        for sort_by in (['self_device_time_total', 'self_cuda_time_total'] if device.type == 'cuda' else []) + ['self_cpu_time_total']:
            try:
                return events.table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=100)
            except (AttributeError, KeyError, ValueError, TypeError):
                continue
        return ''
    with open(path, 'w') as f:
        f.write(table(prof.key_averages(), 60) + '\n')
        f.write('\nBy input shapes:\n' + table(prof.key_averages(group_by_input_shape=True), 40) + '\n')

#----------------------------------------------------------------------------
