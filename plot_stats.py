"""Plot a training run's stats.jsonl: training loss, learning rate and speed
(sec/kimg) against training progress (kimg), as one PNG.

    python plot_stats.py --run=training-runs/00000-... [--dest=stats.png]

Needs matplotlib (not a requirement of the project: pip install matplotlib).
"""

import json
import os

import click

import dnnlib

# (stats.jsonl key, axis label) of each panel, against Progress/kimg.
PANELS = [
    ('Loss/loss',           'loss'),
    ('Progress/lr',         'learning rate'),
    ('Timing/sec_per_kimg', 'sec/kimg'),
]

#----------------------------------------------------------------------------

def read_stats(path):
    """The lines of a stats.jsonl as dicts (a partial last line, from a run killed mid-write, is skipped)."""
    try:
        with open(path, 'rt') as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f'{path} not found: --run must name a training run folder') from None
    stats = []
    for i, line in enumerate(lines):
        try:
            stats.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise ValueError(f'{path}: line {i + 1} is not JSON') from None
    if not stats:
        raise ValueError(f'{path} holds no ticks yet')
    return stats

def series(stats, key):
    """(kimg, mean) of every tick that reported `key`."""
    points = [(line['Progress/kimg']['mean'], line[key]['mean']) for line in stats if key in line and 'Progress/kimg' in line]
    return [x for x, _ in points], [y for _, y in points]

def plot_stats(stats, dest, title=None):
    """Write the panels of PANELS as one PNG, atomically."""
    import matplotlib # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 2.2 * len(PANELS)), sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        x, y = series(stats, key)
        ax.plot(x, y, marker='.' if len(x) < 50 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale('log')
    axes[-1].set_xlabel('kimg')
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    with dnnlib.util.atomic_path(dest) as tmp:
        fig.savefig(tmp, format='png', dpi=100)
    plt.close(fig)

#----------------------------------------------------------------------------

@click.command()
@click.option('--run',  help='Training run folder (holding stats.jsonl)', metavar='DIR', type=str, required=True)
@click.option('--dest', help='Output PNG  [default: DIR/stats.png]', metavar='PNG', type=str)
def main(run, dest):
    """Plot loss, learning rate and sec/kimg of a training run against kimg.

    \b
    python plot_stats.py --run=training-runs/00000-digits-16x16-cond-ddpmpp-edm-cpu-batch64-fp32
    """
    try:
        import matplotlib # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        raise click.ClickException('plot_stats.py needs matplotlib (pip install matplotlib)') from None
    dest = dest if dest is not None else os.path.join(run, 'stats.png')
    try:
        plot_stats(read_stats(os.path.join(run, 'stats.jsonl')), dest, title=os.path.basename(os.path.normpath(run)))
    except OSError as err:
        raise click.ClickException(dnnlib.util.os_error_message(err)) from None
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    print(f'Wrote {dest}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
