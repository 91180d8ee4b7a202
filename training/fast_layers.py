"""Fast forms of the layers of training/networks.py, for torch.compile,
channels-last tensors and reduced precision. Each computes the same function
as the faithful form it replaces, to float32 rounding (tests/test_networks.py).

The networks reach this module only through their fast-path dispatch lines,
when `set_fast_paths` has switched them on; pickles written with the fast
paths off therefore load where this module does not exist (the reference
release). Modules are handed in as arguments and recognised by class name,
since a network loaded from a pickle runs its own copy of networks.py."""

import numpy as np
import torch
from torch.nn.functional import silu
from training.networks import autocast_off

#----------------------------------------------------------------------------
# Version-dependent helpers, chosen once at import: dynamo in torch 2.1 cannot
# trace a try/except around the older calls.

try:
    torch.is_autocast_enabled('cpu')
    _autocast_enabled = torch.is_autocast_enabled
except TypeError: # torch < 2.4: no device argument
    def _autocast_enabled(device_type):
        return torch.is_autocast_enabled() if device_type == 'cuda' else torch.is_autocast_cpu_enabled()

_is_compiling = getattr(torch.compiler, 'is_compiling', None) or torch._dynamo.is_compiling # pylint: disable=protected-access # torch < 2.3

def _at_least_float32(dtype):
    """torch.promote_types(dtype, torch.float32), in a form dynamo traces in torch 2.1 too."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#----------------------------------------------------------------------------
# Layouts fixed for the compiler.

def stored_in_eager_layout(t):
    """`t` itself; under torch.compile, stored once in memory in the layout it has in eager mode rather
    than recomputed in each consumer or laid out as the compiler pleases (inductor fixes the input of
    as_strided to its eager strides). Not for a view into a larger tensor: compiled by PyTorch 2.1.2,
    2.5.1 and 2.11, as_strided of such a view read its storage from the start."""
    return torch.as_strided(t, t.shape, t.stride()) if _is_compiling() else t

def inference_layout(t):
    """stored_in_eager_layout(t) without autograd; under autograd `t` itself, since the backward of
    as_strided adds a zero-filled copy of the gradient (and training graphs keep channels-last anyway)."""
    return t if t.requires_grad else stored_in_eager_layout(t)

def cat_skip(x, skip):
    """torch.cat([x, skip], dim=1) for the decoders, from inputs in their channels-last layout: inductor
    lays a concatenation out channels-last only if one input already has a fixed channels-last layout,
    and otherwise writes it NCHW and transposes it back for the convolutions."""
    return torch.cat([inference_layout(x), inference_layout(skip)], dim=1)

#----------------------------------------------------------------------------
# Convolution: pooling for the [1,1] filter, and a per-channel term added
# together with the bias.

def pools(conv):
    """Whether `conv` resamples with the [1,1] box filter, unfused: average pooling and nearest
    upsampling then give the values of its depthwise (transposed) convolutions."""
    f = conv.resample_filter
    return f is not None and not conv.fused_resample and f.shape == (1, 1, 2, 2) and bool((f == 0.25).all())

def upsample_nearest2x(x):
    """Nearest-neighbour upsampling by 2. Under autograd, as a broadcast of each pixel to its 2x2 block,
    whose gradient is a sum over the block: compiled, interpolate's gradient is a scatter with atomic
    additions into a zero-filled NCHW buffer. In inference interpolate fuses with its producer."""
    if not x.requires_grad:
        return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
    N, C, H, W = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        x = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(N, H, 2, W, 2, C)
        return x.reshape(N, 2 * H, 2 * W, C).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(N, C, H, 2, W, 2).reshape(N, C, 2 * H, 2 * W)

def conv2d(conv, x, term=None):
    """Conv2d.forward of an unfused `conv`, resampling by pooling where its fast path is on (set_fast_paths
    switches it on where pools(conv)), and with `term`, a tensor broadcast to the output that already
    holds the bias, added in place of the bias."""
    w = conv.weight.to(x.dtype) if conv.weight is not None else None
    if conv.fast_paths:
        x = upsample_nearest2x(x) if conv.up else torch.nn.functional.avg_pool2d(x, 2) if conv.down else x
    elif conv.up or conv.down:
        f = conv.resample_filter.to(x.dtype)
        channels, f_pad = conv.in_channels, (f.shape[-1] - 1) // 2
        if conv.up:
            x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=f_pad)
        else:
            x = torch.nn.functional.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=f_pad)
    if w is not None:
        x = torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)
    if term is not None: # one tensor already (a view, maybe: see stored_in_eager_layout)
        return x.add_(term.to(x.dtype))
    if conv.bias is not None:
        return x.add_(conv.bias.to(x.dtype).reshape(1, -1, 1, 1))
    return x

#----------------------------------------------------------------------------
# Group normalisation with the statistics taken in place on channels-last
# tensors.

def _groups(t, G):
    """[N, H*W, G, C/G] view of a channels-last [N, C, H, W] tensor."""
    N, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(N, H * W, G, C // G)

def _ungroup(t, shape):
    """Inverse of _groups: [N, C, H, W] in channels-last layout."""
    N, C, H, W = shape
    return t.reshape(N, H, W, C).permute(0, 3, 1, 2)

def _normalize(x, G, weight, bias, eps):
    """(y, mean, rstd) of group_norm_nhwc: y at least float32, mean and rstd [N, 1, G, 1]."""
    dtype = _at_least_float32(x.dtype)
    xg = _groups(x.to(dtype), G)
    origin = xg[:, :1, :, :1] # the statistics do not depend on it
    mean = xg.mean(dim=(1, 3), keepdim=True)
    # x - origin has one use only: with two, inductor may store it whole (in float32) before reducing.
    var = ((xg - origin).square().mean(dim=(1, 3), keepdim=True) - (mean - origin).square()).clamp(min=0)
    rstd = torch.rsqrt(var + eps)
    scale = stored_in_eager_layout(rstd * weight.to(dtype).reshape(G, -1))
    shift = stored_in_eager_layout(bias.to(dtype).reshape(G, -1) - mean * scale)
    return _ungroup(xg * scale + shift, x.shape), mean, rstd

class GroupNormNHWC(torch.autograd.Function):
    """group_norm_nhwc under autograd, with a backward written for the compiler: the gradient's sums are
    taken per image and channel over the pixels (one reduction pass for the weight, bias and group sums),
    then the input's gradient in one pointwise pass. Autograd's own backward of the same forward takes
    three reduction passes over the activations and recomputes the group means in a fourth."""

    @staticmethod
    def forward(ctx, x, weight, bias, G, eps):
        y, mean, rstd = _normalize(x, G, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.G = G
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        G = ctx.G
        dtype = _at_least_float32(x.dtype)
        xhat = (_groups(x.to(dtype), G) - mean) * rstd
        dyg = _groups(dy.to(dtype), G)
        w = weight.to(dtype).reshape(G, -1)
        # Sums over the pixels of dy and dy * xhat, [N, 2, G, C/G]; with dxhat = dy * w, their means per group.
        sums = torch.cat([dyg.sum(dim=1, keepdim=True), (dyg * xhat).sum(dim=1, keepdim=True)], dim=1)
        means = (sums * w).sum(dim=3, keepdim=True) / (dyg.shape[1] * dyg.shape[3])
        dx = _ungroup(rstd * (dyg * w - means[:, :1] - xhat * means[:, 1:]), x.shape).to(x.dtype)
        dbias, dweight = sums.sum(dim=0).reshape(2, -1).to(weight.dtype).unbind(0)
        return dx, dweight, dbias, None, None

def group_norm_nhwc(x, num_groups, weight, bias, eps):
    """group_norm of a channels-last tensor, with its groups viewed in place rather than copied to NCHW
    (the copy compiled group_norm makes); at least float32 arithmetic, and float32 output under autocast.

    The two passes over x are kernels limited by their per-element instructions, so the statistics are
    plain sums (no per-element division, as Welford's update has), the variance taken about one value of
    each group (so that E[d^2] - E[d]^2 does not cancel), and the normalisation is one multiply-add per
    element with a scale and shift stored per image and channel. Under autograd the backward is
    GroupNormNHWC's (autograd's own, of this form, is much heavier)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        y = GroupNormNHWC.apply(x, weight, bias, num_groups, eps)
    else:
        y = _normalize(x, num_groups, weight, bias, eps)[0]
    return y if _autocast_enabled(x.device.type) else y.to(x.dtype)

def group_norm(norm, x):
    """GroupNorm.forward: group_norm_nhwc for channels-last inputs, group_norm otherwise."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return group_norm_nhwc(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return torch.nn.functional.group_norm(x, num_groups=norm.num_groups, weight=norm.weight.to(x.dtype), bias=norm.bias.to(x.dtype), eps=norm.eps)

#----------------------------------------------------------------------------
# Attention by scaled_dot_product_attention.

def attention_heads(qkv, num_heads):
    """Self-attention of each head of `qkv` [N, 3*C, H, W], whose channels are ordered (head, channel
    within head, q|k|v); returns [N, C, H, W] with channels ordered (head, channel). SDPA, with autocast
    off (float32 inputs stay float32, as the faithful attention's softmax)."""
    N, C, H, W = qkv.shape[0], qkv.shape[1] // 3, qkv.shape[2], qkv.shape[3]
    if qkv.is_contiguous(memory_format=torch.channels_last):
        # Pixel-major [N, L, heads, C/heads] views of channels-last qkv: the gradients then assemble into
        # qkv's own layout, and the output is a channels-last view.
        heads = qkv.permute(0, 2, 3, 1).reshape(N, H * W, num_heads, C // num_heads, 3)
        q, k, v = [t.contiguous().transpose(1, 2) for t in heads.unbind(4)]
        with autocast_off(q.device):
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return a.transpose(1, 2).reshape(N, H, W, C).permute(0, 3, 1, 2)
    # [N*heads, 1, L, C/heads] with contiguous channels, as the fused kernels need (otherwise SDPA runs float32 math).
    q, k, v = [t.transpose(1, 2).unsqueeze(1).contiguous() for t in qkv.reshape(N * num_heads, C // num_heads, 3, H * W).unbind(2)]
    with autocast_off(q.device):
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return a.squeeze(1).transpose(1, 2).reshape(N, C, H, W)

#----------------------------------------------------------------------------
# U-Net block and the U-Nets' blocks.

def folds_conv0_bias(block):
    """Whether the fast block adds conv0's bias and the embedding's shift as one term (no adaptive
    scale): compiled, norm1's input then reads two buffers rather than four, few enough for inductor to
    recompute it in the backward kernels instead of storing the normalised values and the output."""
    return not block.adaptive_scale

def unet_block(block, x, emb, params=None):
    """UNetBlock.forward; `params` is the block's affine(emb) when the caller has computed it
    (merged_affine), then with conv0's bias added where folds_conv0_bias(block)."""
    orig = x
    h = silu(block.norm0(x))
    if folds_conv0_bias(block):
        if params is None:
            params = block.affine(emb)
            params = stored_in_eager_layout(params + block.conv0.bias.to(params.dtype)) # not a view: stored once
        x = silu(block.norm1(conv2d(block.conv0, h, term=params.unsqueeze(2).unsqueeze(3))))
    else:
        x = block.conv0(h)
        params = (block.affine(emb) if params is None else params).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if block.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, block.norm1(x), scale + 1))
        else:
            x = silu(block.norm1(x.add_(params)))

    x = block.conv1(torch.nn.functional.dropout(x, p=block.dropout, training=block.training))
    x = x.add_(block.skip(orig) if block.skip is not None else orig)
    x = x * block.skip_scale

    if block.num_heads:
        x = block.proj(attention_heads(block.qkv(block.norm2(x)), block.num_heads)).add_(x)
        x = x * block.skip_scale
    return inference_layout(x) # compiled: in the layout of the convolutions, which it feeds

def merged_affine(blocks, emb):
    """[block.affine(emb) for block in blocks] as one matrix product, with conv0's bias added for the
    blocks that fold it: one GEMM of the embedding in place of one per block, and one bias addition in
    place of one per block. Compiled with frozen weights, the concatenated weights and biases are
    constants."""
    weight = torch.cat([block.affine.weight for block in blocks])
    bias = torch.cat([block.affine.bias + block.conv0.bias if folds_conv0_bias(block) else block.affine.bias for block in blocks])
    params = torch.addmm(bias.to(emb.dtype), emb, weight.to(emb.dtype).t())
    return params.split([block.affine.out_features for block in blocks], dim=1)

def _is_block(name):
    """Whether the U-Net entry of this name is a UNetBlock (not the first convolution or an aux layer)."""
    return not name.endswith('_conv') and '_aux_' not in name

def unet_blocks(unet, x, emb):
    """The rest of SongUNet.forward or DhariwalUNet.forward from the embedding `emb`: the encoder and the
    decoder, with the blocks' affine layers as one matrix product and the skip concatenations made from
    channels-last inputs; then DhariwalUNet's output layers."""
    blocks = [block for name, block in [*unet.enc.items(), *unet.dec.items()] if _is_block(name)]
    params = iter(merged_affine(blocks, emb))

    # Encoder.
    skips = []
    aux = x
    for name, block in unet.enc.items():
        if 'aux_down' in name:
            aux = block(aux)
        elif 'aux_skip' in name:
            x = skips[-1] = x + block(aux)
        elif 'aux_residual' in name:
            x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
        else:
            x = unet_block(block, x, emb, next(params)) if _is_block(name) else block(x)
            skips.append(x)

    # Decoder.
    aux = None
    tmp = None
    for name, block in unet.dec.items():
        if 'aux_up' in name:
            aux = block(aux)
        elif 'aux_norm' in name:
            tmp = block(x)
        elif 'aux_conv' in name:
            tmp = block(silu(tmp))
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != block.in_channels:
                x = cat_skip(x, skips.pop())
            x = unet_block(block, x, emb, next(params))
    return aux if aux is not None else unet.out_conv(silu(unet.out_norm(x)))

#----------------------------------------------------------------------------
# The switch: the networks' layers take the forms of this module.

_FAST_CLASSES = ('Conv2d', 'GroupNorm', 'UNetBlock', 'SongUNet', 'DhariwalUNet') # of training/networks.py, by name

def set_fast_paths(net, enabled=True):
    """Switch the layers of `net` (or a layer) between their faithful forms and their fast forms
    (this module's), which compute the same function to float32
    rounding: scaled_dot_product_attention, average pooling and nearest
    upsampling for the [1,1] resampling filter, group statistics taken in
    place on channels-last tensors, the blocks' affine layers as one matrix
    product of the embedding, and layouts fixed for torch.compile. Returns
    the number of modules switched."""
    count = 0
    for module in net.modules():
        if type(module).__name__ in _FAST_CLASSES and hasattr(module, 'fast_paths'):
            # Convolutions have a fast form only where they resample with the [1,1] filter (decided here, not in the graph).
            module.fast_paths = bool(enabled and (type(module).__name__ != 'Conv2d' or pools(module)))
            count += int(module.fast_paths)
    return count

#----------------------------------------------------------------------------
