"""Convert a network between a pickle (ours, the reference's, edm2's) and
.safetensors, the format that carries no code (training/safetensors_io.py).

    python -m training.convert network.pkl network.safetensors
    python -m training.convert network.safetensors network.pkl
"""

import pickle

import click

import dnnlib
from training import network_io, safetensors_io

#----------------------------------------------------------------------------

def convert(src, dest, allow_code=False):
    """Write the network of `src` (a pickle or .safetensors, path or URL) to `dest` (.safetensors or .pkl)."""
    if not dest.endswith(('.safetensors', '.pkl')):
        raise ValueError(f'{dest}: the destination must end in .safetensors or .pkl')
    net = network_io.rebuild_network(network_io.load_network_pkl(src, allow_code=allow_code)) # this project's class
    if dest.endswith('.safetensors'):
        safetensors_io.save_network(net, dest)
    else:
        with dnnlib.util.atomic_write(dest, 'wb') as f:
            pickle.dump(dict(ema=net), f)

@click.command()
@click.argument('src')
@click.argument('dest')
@click.option('--allow-code', help='Load a source pickle that names code other than ours', is_flag=True)
def main(src, dest, allow_code):
    """Convert the network of SRC (pickle or .safetensors, path or URL) to DEST (.safetensors or .pkl)."""
    try:
        convert(src, dest, allow_code=allow_code)
    except (ValueError, IOError) as err:
        raise click.ClickException(dnnlib.util.os_error_message(err) if isinstance(err, OSError) else str(err)) from None
    print(f'{src} -> {dest}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
