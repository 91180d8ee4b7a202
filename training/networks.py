"""Network architectures and preconditioning from the paper "Elucidating the
Design Space of Diffusion-Based Generative Models" (Karras et al. 2022):
DDPM++ and NCSN++ (SongUNet), ADM (DhariwalUNet), and the VP, VE, iDDPM and
EDM preconditioners that wrap them.

The source of this module travels inside network pickles and is executed by
whoever loads them (the reference release too), so it imports only the standard
library, numpy, torch and torch_utils.persistence. The layers' fast forms, for torch.compile
and reduced precision, live in training/fast_layers.py: each layer's forward
is the faithful formula, with one dispatch line to its fast form, taken only
when training/fast_layers.py's set_fast_paths has switched it on."""

import contextlib

import numpy as np
import torch
from torch.nn.functional import silu
from torch_utils import persistence

#----------------------------------------------------------------------------
# Weight initialisation.

def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor of the given shape, scaled for the given init mode."""
    # In-place arithmetic: same numbers as scale * (2 * rand - 1), without large temporaries.
    if mode == 'xavier_uniform':
        return torch.rand(*shape).mul_(2).sub_(1).mul_(np.sqrt(6 / (fan_in + fan_out)))
    if mode == 'xavier_normal':
        return torch.randn(*shape).mul_(np.sqrt(2 / (fan_in + fan_out)))
    if mode == 'kaiming_uniform':
        return torch.rand(*shape).mul_(2).sub_(1).mul_(np.sqrt(3 / fan_in))
    if mode == 'kaiming_normal':
        return torch.randn(*shape).mul_(np.sqrt(1 / fan_in))
    raise ValueError(f'invalid init_mode {mode!r}: expected xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal')

#----------------------------------------------------------------------------
# Fully connected layer.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self,
        in_features,                    # Number of input features.
        out_features,                   # Number of output features.
        bias            = True,         # Add a learned bias?
        init_mode       = 'kaiming_normal', # Weight init mode (see weight_init).
        init_weight     = 1,            # Multiplier for the initial weight.
        init_bias       = 0,            # Multiplier for the initial bias.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init_kwargs = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **init_kwargs).mul_(init_weight))
        self.bias = torch.nn.Parameter(weight_init([out_features], **init_kwargs).mul_(init_bias)) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x

#----------------------------------------------------------------------------
# Convolution with optional up/down-sampling by a separable FIR filter.

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    fast_paths = False # Take the fast form: pooling for the [1,1] filter (see fast_layers.set_fast_paths).

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        kernel,                         # Kernel size; 0 = no weight (pure resampling).
        bias            = True,         # Add a learned bias (only with a kernel)?
        up              = False,        # Upsample by 2 before the convolution?
        down            = False,        # Downsample by 2 before the convolution?
        resample_filter = [1,1],        # 1D resampling filter taps.
        fused_resample  = False,        # Fuse the resampling with the convolution?
        init_mode       = 'kaiming_normal', # Weight init mode (see weight_init).
        init_weight     = 1,            # Multiplier for the initial weight.
        init_bias       = 0,            # Multiplier for the initial bias.
    ):
        if up and down:
            raise ValueError('Conv2d: up and down are mutually exclusive')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        init_kwargs = dict(mode=init_mode, fan_in=in_channels*kernel*kernel, fan_out=out_channels*kernel*kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **init_kwargs).mul_(init_weight)) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **init_kwargs).mul_(init_bias)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square() # outer(f, f) / sum(f)^2 as [1, 1, len, len]
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        if self.fast_paths: return _fast_layers().conv2d(self, x)
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = torch.nn.functional.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad)
            x = torch.nn.functional.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = torch.nn.functional.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

#----------------------------------------------------------------------------
# Group normalisation with a cap on the number of groups.

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    fast_paths = False # Take the fast form (see fast_layers.set_fast_paths).

    def __init__(self,
        num_channels,                   # Number of channels.
        num_groups      = 32,           # Maximum number of groups.
        min_channels_per_group = 4,     # Fewer groups when channels are scarce.
        eps             = 1e-5,         # Added to the variance.
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        if self.fast_paths: return _fast_layers().group_norm(self, x)
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# Attention weights softmax(q . k / sqrt(c)), computed in float32 in both the
# forward and the backward pass whatever the input dtype (and with autocast
# off), returned in the dtype of q; the backward pass starts from the weights
# as returned, as the reference's does.

def autocast_off(device):
    """Context that disables autocast on the given device (no-op where unsupported)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()

class AttentionOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k):
        with autocast_off(q.device):
            w = torch.einsum('ncq,nck->nqk', q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32)).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w) # in q's dtype, as the reference: its float16 gradients
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        with autocast_off(q.device):
            dw, w = dw.to(torch.float32), w.to(torch.float32)
            db = w * (dw - (dw * w).sum(dim=2, keepdim=True)) # Softmax backward.
            dq = torch.einsum('nck,nqk->ncq', k.to(torch.float32), db).to(q.dtype) / np.sqrt(k.shape[1])
            dk = torch.einsum('ncq,nqk->nck', q.to(torch.float32), db).to(k.dtype) / np.sqrt(k.shape[1])
        return dq, dk

#----------------------------------------------------------------------------
# U-Net block: residual block with optional up/down-sampling and
# self-attention, conditioned on an embedding vector.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    fast_paths = False # Take the fast form (see fast_layers.set_fast_paths).

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        emb_channels,                   # Number of embedding channels.
        up              = False,        # Upsample by 2?
        down            = False,        # Downsample by 2?
        attention       = False,        # Add self-attention?
        num_heads       = None,         # Attention heads; None = out_channels // channels_per_head.
        channels_per_head = 64,         # Channels per head when num_heads is None.
        dropout         = 0,            # Dropout probability.
        skip_scale      = 1,            # Scale of the residual sums.
        eps             = 1e-5,         # GroupNorm epsilon.
        resample_filter = [1,1],        # 1D resampling filter taps.
        resample_proj   = False,        # Use a 1x1 convolution on a resampled skip?
        adaptive_scale  = True,         # Embedding gives scale and shift (True) or a bias (False).
        init            = dict(),       # Init kwargs of most layers.
        init_zero       = dict(init_weight=0), # Init kwargs of the last layer of each branch.
        init_attn       = None,         # Init kwargs of qkv; None = init.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = float(skip_scale) # compiled, a NumPy scalar becomes a CPU tensor input, which rules out CUDA graphs
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels*(2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels*3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        if self.fast_paths: return _fast_layers().unet_block(self, x, emb)
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            w = AttentionOp.apply(q, k)
            a = torch.einsum('nqk,nck->ncq', w, v)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x

#----------------------------------------------------------------------------
# Fast paths: the fast forms of training/fast_layers.py in place of the
# faithful ones, switched on by fast_layers.set_fast_paths.

def _fast_layers():
    """The module of the fast forms, imported when a fast path is first taken."""
    from training import fast_layers # pylint: disable=import-outside-toplevel
    return fast_layers

#----------------------------------------------------------------------------
# Noise-level embeddings.

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels,                   # Output channels (cos half, sin half).
        max_positions   = 10000,        # Lowest frequency is 1/max_positions.
        endpoint        = False,        # Include the lowest frequency exactly?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels,                   # Output channels (cos half, sin half).
        scale           = 16,           # Standard deviation of the random frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

def add_embedding(emb, term):
    """emb + term in emb's dtype, as type promotion gives it; the explicit cast keeps inductor from fusing
    float32 and a bfloat16 matrix product into one mixed-dtype addmm, which fails."""
    return emb + term.to(emb.dtype)

#----------------------------------------------------------------------------
# DDPM++ and NCSN++ (Song et al. 2021, "Score-Based Generative Modeling
# through Stochastic Differential Equations").

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    fast_paths = False # Take the fast form of the blocks (see fast_layers.set_fast_paths).

    def __init__(self,
        img_resolution,                 # Image resolution.
        in_channels,                    # Number of input color channels.
        out_channels,                   # Number of output color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        augment_dim     = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels  = 128,          # Base multiplier for the number of channels.
        channel_mult    = [1,2,2,2],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb = 4,           # Multiplier for the embedding dimensionality.
        num_blocks      = 4,            # Number of residual blocks per resolution.
        attn_resolutions = [16],        # Resolutions with self-attention.
        dropout         = 0.10,         # Dropout probability of intermediate activations.
        label_dropout   = 0,            # Dropout probability of class labels (classifier-free guidance).

        embedding_type  = 'positional', # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise = 1,         # Noise embedding channels: 1 (DDPM++) or 2 (NCSN++) times model_channels.
        encoder_type    = 'standard',   # Encoder: 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type    = 'standard',   # Decoder: 'standard' (DDPM++) or 'skip' (NCSN++).
        resample_filter = [1,1],        # Resampling filter: [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    ):
        if embedding_type not in ('fourier', 'positional'):
            raise ValueError(f'invalid embedding_type {embedding_type!r}: expected fourier or positional')
        if encoder_type not in ('standard', 'skip', 'residual'):
            raise ValueError(f'invalid encoder_type {encoder_type!r}: expected standard, skip or residual')
        if decoder_type not in ('standard', 'skip'):
            raise ValueError(f'invalid decoder_type {decoder_type!r}: expected standard or skip')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = (res in attn_resolutions)
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # sin half first, then cos.
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = add_embedding(emb, self.map_label(tmp * np.sqrt(self.map_label.in_features)))
        if self.map_augment is not None and augment_labels is not None:
            emb = add_embedding(emb, self.map_augment(augment_labels))
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))
        if self.fast_paths: return _fast_layers().unet_blocks(self, x, emb)

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------
# ADM (Dhariwal and Nichol 2021, "Diffusion Models Beat GANs on Image
# Synthesis").

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    fast_paths = False # Take the fast form of the blocks (see fast_layers.set_fast_paths).

    def __init__(self,
        img_resolution,                 # Image resolution.
        in_channels,                    # Number of input color channels.
        out_channels,                   # Number of output color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        augment_dim     = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels  = 192,          # Base multiplier for the number of channels.
        channel_mult    = [1,2,3,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb = 4,           # Multiplier for the embedding dimensionality.
        num_blocks      = 3,            # Number of residual blocks per resolution.
        attn_resolutions = [32,16,8],   # Resolutions with self-attention.
        dropout         = 0.10,         # Dropout probability of intermediate activations.
        label_dropout   = 0,            # Dropout probability of class labels (classifier-free guidance).
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = add_embedding(emb, self.map_augment(augment_labels))
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = add_embedding(emb, self.map_label(tmp))
        emb = silu(emb)
        if self.fast_paths: return _fast_layers().unet_blocks(self, x, emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = self.out_conv(silu(self.out_norm(x)))
        return x

#----------------------------------------------------------------------------
# Preconditioning shared by the four formulations: the inner model, selected
# by name, runs on c_in x and c_noise; D(x) = c_skip x + c_out F(c_in x, c_noise).

_MODEL_TYPES = {
    'SongUNet':     SongUNet,
    'DhariwalUNet': DhariwalUNet,
}

def _make_model(model_type, **kwargs):
    """Construct the inner model class named model_type."""
    if model_type not in _MODEL_TYPES:
        raise ValueError(f'invalid model_type {model_type!r}: expected one of {", ".join(_MODEL_TYPES)}')
    return _MODEL_TYPES[model_type](**kwargs)

def _precond_inputs(x, sigma, class_labels, label_dim):
    """Inputs at the network boundary: float32 x, sigma as [N,1,1,1], labels as [-1, label_dim] or None."""
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma).to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
    if label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, label_dim)
    return x, sigma, class_labels

def _model_dtype(use_fp16, force_fp32, x):
    """float16 only when asked for, not forced off, and on CUDA; float32 otherwise."""
    return torch.float16 if (use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

#----------------------------------------------------------------------------
# Variance preserving (VP) formulation (Song et al. 2021).

@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the model in float16 (on CUDA)?
        beta_d          = 19.9,         # Extent of the noise level schedule.
        beta_min        = 0.1,          # Initial slope of the noise level schedule.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        epsilon_t       = 1e-5,         # Minimum t-value used during training.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _precond_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _model_dtype(self.use_fp16, force_fp32, x)

        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def sigma(self, t):
        """Noise level at time t: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Time t at which the noise level is sigma."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# Variance exploding (VE) formulation (Song et al. 2021).

@persistence.persistent_class
class VEPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the model in float16 (on CUDA)?
        sigma_min       = 0.02,         # Minimum supported noise level.
        sigma_max       = 100,          # Maximum supported noise level.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _precond_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _model_dtype(self.use_fp16, force_fp32, x)

        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# Improved DDPM formulation (Nichol and Dhariwal 2021), with noise levels
# rounded to the M+1 discrete levels u[j].

@persistence.persistent_class
class iDDPMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the model in float16 (on CUDA)?
        C_1             = 0.001,        # Timestep adjustment at low noise levels.
        C_2             = 0.008,        # Timestep adjustment at high noise levels.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        model_type      = 'DhariwalUNet', # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels*2, label_dim=label_dim, **model_kwargs)

        u = torch.zeros(M + 1)
        for j in range(M, 0, -1): # M, ..., 1
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _precond_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _model_dtype(self.use_fp16, force_fp32, x)

        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        D_x = c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)
        return D_x

    def alpha_bar(self, j):
        """DDPM cumulative signal fraction at step j (cosine schedule)."""
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Nearest discrete noise level u[j] (or its index j), keeping sigma's shape, dtype and device."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

#----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, section 5 and table 1).

@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the model in float16 (on CUDA)?
        sigma_min       = 0,            # Minimum supported noise level.
        sigma_max       = float('inf'), # Maximum supported noise level.
        sigma_data      = 0.5,          # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet', # Class name of the underlying model.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _precond_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _model_dtype(self.use_fp16, force_fp32, x)

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
