"""Loading network pickles (paths or URLs) with clear errors."""

import pickle

import dnnlib

#----------------------------------------------------------------------------

def load_network_pkl(network_pkl, key='ema', verbose=True):
    """Return `pickle.load(f)[key]` for a network pickle given as a path or URL.

    Raises ValueError (or IOError for failed downloads) with a one-line message
    naming the file when it is missing, unreadable, not a pickle, or lacks `key`.
    """
    try:
        with dnnlib.util.open_url(network_pkl, verbose=verbose) as f:
            data = pickle.load(f)
    except FileNotFoundError:
        raise ValueError(f'network pickle not found: {network_pkl}') from None
    except IsADirectoryError:
        raise ValueError(f'network pickle is a directory, not a file: {network_pkl}') from None
    except PermissionError:
        raise ValueError(f'network pickle is not readable: {network_pkl}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f'{network_pkl} is not a readable network pickle ({type(err).__name__}: {err})') from None
    if not isinstance(data, dict) or key not in data:
        found = ', '.join(map(str, data.keys())) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{network_pkl} holds no {key!r} network (found: {found})')
    return data[key]

#----------------------------------------------------------------------------
