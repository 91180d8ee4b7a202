"""Post-hoc EMA: reconstruct the power-function EMA of any relative standard
deviation from the phema snapshots of a run trained with `train.py --phema`
(Karras et al. 2024, Section 3.2), as a network pickle for generate.py and
fid.py."""

import os
import pickle

import click

import dnnlib
from training import phema, safetensors_io

#----------------------------------------------------------------------------

def dest_paths(dest, stds, label):
    """Output pickle of each std: `dest` itself (one std, ending in .pkl), `dest` with {std} and {kimg}
    filled in, or reconstructed-NNNNNN-S.SSS.pkl in the folder `dest`."""
    if '{std}' in dest or '{kimg}' in dest:
        paths = [dest.replace('{std}', f'{std:.3f}').replace('{kimg}', label) for std in stds]
    elif dest.endswith(('.pkl', '.safetensors')):
        if len(stds) > 1:
            raise ValueError(f'--dest={dest} names one file; for several --std values give a folder or a pattern with {{std}}')
        paths = [dest]
    else:
        paths = [os.path.join(dest, f'reconstructed-{label}-{std:.3f}.pkl') for std in stds]
    if len(set(paths)) != len(paths):
        raise ValueError(f'--dest={dest} gives the same file for several --std values; include {{std}}')
    return paths

#----------------------------------------------------------------------------

@click.command()
@click.option('--run', 'run_dir', help='Training run directory with phema-*.pkl', metavar='DIR',        type=str, required=True)
@click.option('--std',            help='Relative standard deviation(s), e.g. 0.03,0.05,0.1', metavar='LIST', type=str, required=True)
@click.option('--at', 'at_kimg',  help='Training time of the phema snapshots to use  [default: last]', metavar='KIMG', type=click.FloatRange(min=0))
@click.option('--dest',           help='Output pickle (or .safetensors), folder, or pattern with {std} and {kimg}', metavar='PKL|DIR', type=str, required=True)

def main(run_dir, std, at_kimg, dest):
    """Reconstruct the EMA of relative standard deviation --std (sigma_rel)
    of a run trained with --phema, as a network pickle.

    The power-function EMAs that train.py stored (phema-NNNNNN-S.SSS.pkl)
    are combined by least squares to match the averaging profile of each
    requested sigma_rel at the time of the snapshots of --at.

    Examples:

    \b
    # One EMA length, at the end of the run
    python reconstruct_ema.py --run=training-runs/00000-... --std=0.075 --dest=ema-0.075.pkl

    \b
    # A sweep at 100 kimg, into a folder (reconstructed-000100-0.030.pkl, ...)
    python reconstruct_ema.py --run=training-runs/00000-... --std=0.03,0.05,0.1 --at=100 --dest=out
    """
    try:
        stds = phema.parse_stds(std, '--std')
        dest_paths(dest, stds, '000000') # a bad --dest fails before the work
        at_kimg = at_kimg if at_kimg is None or not at_kimg.is_integer() else int(at_kimg)
        time_r, results = phema.reconstruct(run_dir, stds, at_kimg=at_kimg)
        at_kimg = max(kimg for kimg, _path in phema.list_snapshots(run_dir)) if at_kimg is None else at_kimg
        paths = dest_paths(dest, stds, phema.file_label(at_kimg))
    except (ValueError, IOError) as err:
        raise click.ClickException(str(err)) from None
    for (sigma_rel, data, residual), path in zip(results, paths):
        try:
            if path.endswith('.safetensors'): # the EMA weights alone, in the format that carries no code
                safetensors_io.save_network(data['ema'], path)
            else:
                with dnnlib.util.atomic_write(path, 'wb') as f:
                    pickle.dump(data, f)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            raise click.ClickException(f'cannot write {path} (--dest): {err.strerror or err}') from None
        print(f'sigma_rel {sigma_rel:.3f} at {time_r} images: profile error {residual:.2%} -> {path}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
