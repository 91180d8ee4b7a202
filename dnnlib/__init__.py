"""Generic utilities shared by every script: EasyDict, cached downloads, construct-by-name."""

from . import util
from .util import EasyDict, make_cache_dir_path
