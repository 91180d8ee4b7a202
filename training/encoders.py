"""Encoders between pixels and the network's data space, as stored in EDM2
network pickles (`encoder`): pixels scaled to [-1, 1] (StandardRGBEncoder),
or the latents of Stability AI's VAE (StabilityVAEEncoder, Section 2 of
"Analyzing and Improving the Training Dynamics of Diffusion Models").

Class and argument names are those of the published release, whose pickles
carry them. The source of this module travels inside those pickles and is
executed by whoever loads them in full, so it imports only numpy, torch and
torch_utils.persistence at the top level. Images are NCHW tensors; raw pixels
are uint8."""

import os

import numpy as np
import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# Base class: raw pixels -> raw latents (stored in a dataset) -> final latents
# (the network's data), and final latents -> raw pixels.

@persistence.persistent_class
class Encoder:
    def __init__(self):
        pass

    def init(self, device): # load lazily initialised parts now, on `device`
        pass

    def __getstate__(self):
        return self.__dict__

    def encode(self, x): # raw pixels -> final latents
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x): # raw pixels -> raw latents
        raise NotImplementedError

    def encode_latents(self, x): # raw latents -> final latents
        raise NotImplementedError

    def decode(self, x): # final latents -> raw pixels
        raise NotImplementedError

#----------------------------------------------------------------------------
# Pixels scaled to [-1, 1].

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    def __init__(self):
        super().__init__()

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
# Latents of Stability AI's VAE (needs the diffusers package and the VAE weights).

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    def __init__(self,
        vae_name    = 'stabilityai/sd-vae-ft-mse',  # The VAE, as diffusers names it.
        raw_mean    = [5.81, 3.25, 0.12, -2.15],    # Mean of the raw latents. pylint: disable=dangerous-default-value
        raw_std     = [4.17, 4.62, 3.71, 3.28],     # Standard deviation of the raw latents. pylint: disable=dangerous-default-value
        final_mean  = 0,                            # Mean of the final latents.
        final_std   = 0.5,                          # Standard deviation of the final latents.
        batch_size  = 8,                            # Batch size for running the VAE.
    ):
        super().__init__()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def init(self, device):
        super().init(device)
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device=device)
        else:
            self._vae.to(device)

    def __getstate__(self):
        return dict(super().__getstate__(), _vae=None) # the VAE is not pickled

    def _const(self, x, value):
        return torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)

    def encode_pixels(self, x): # pixels -> [mean, std] of the latent distribution
        self.init(x.device)
        x = x.to(torch.float32) / 255
        dists = [self._vae.encode(batch)['latent_dist'] for batch in x.split(self.batch_size)]
        return torch.cat([torch.cat([d.mean, d.std], dim=1) for d in dists])

    def encode_latents(self, x): # a draw from the latent distribution, whitened
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        return x * self._const(x, self.scale) + self._const(x, self.bias)

    def decode(self, x):
        self.init(x.device)
        x = x.to(torch.float32)
        x = (x - self._const(x, self.bias)) / self._const(x, self.scale)
        x = torch.cat([self._vae.decode(batch)['sample'] for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------

def load_stability_vae(vae_name='stabilityai/sd-vae-ft-mse', device=torch.device('cpu')):
    """The diffusers AutoencoderKL `vae_name`: a local folder (as save_pretrained writes it), or a model name
    from the cache (dnnlib's 'diffusers' folder) or downloaded once. Safetensors weights only, never a pickle:
    vae_name may come from a file (a pickle's encoder, a run's options)."""
    import dnnlib # pylint: disable=import-outside-toplevel
    cache_dir = dnnlib.make_cache_dir_path('diffusers')
    os.environ['HF_HUB_DISABLE_SYMLINKS_WARNING'] = '1'
    os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'
    os.environ['HF_HOME'] = cache_dir
    try:
        import diffusers # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError(f'StabilityVAEEncoder needs the diffusers package for the VAE {vae_name} (pip install diffusers)') from None
    diffusers.utils.logging.set_verbosity_error() # its advice on optional packages is not ours to print
    load = lambda **kwargs: diffusers.models.AutoencoderKL.from_pretrained(vae_name, use_safetensors=True, **kwargs)
    if os.path.isdir(vae_name):
        try:
            vae = load(local_files_only=True)
        except (OSError, ValueError) as err:
            raise IOError(f'StabilityVAEEncoder: {vae_name} holds no AutoencoderKL with safetensors weights '
                          f'({str(err).splitlines()[0] if str(err) else type(err).__name__})') from None
    else:
        try: # the cache first, so that no network access happens once the weights are there
            vae = load(cache_dir=cache_dir, local_files_only=True)
        except (OSError, ValueError):
            try:
                vae = load(cache_dir=cache_dir)
            except (OSError, ValueError) as err:
                raise IOError(f'StabilityVAEEncoder: the VAE weights {vae_name} are neither in {cache_dir} nor downloadable ({type(err).__name__})') from None
    return vae.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
