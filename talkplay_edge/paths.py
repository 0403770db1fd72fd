"""Where talkplay's files live: the embedded catalog and model, the user's data and cache directories."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_DATA_DIR = REPO_DIR.parent / "shared" / "data"  # the shared source data beside the repo


def embedded_catalog_path() -> Path:
    """The demo catalog shipped at the repository root."""
    return REPO_DIR / "catalog.db"


def user_catalog_path() -> Path:
    """The user's own catalog, ``data_dir()/catalog.db``: written by `talkplay index` (a copy of the
    embedded catalog plus the indexed local files); may not exist yet."""
    return data_dir() / "catalog.db"


def default_catalog_path() -> Path:
    """The catalog `chat`/`ask` and the other commands read by default: $TALKPLAY_CATALOG when set, else
    the user catalog (``user_catalog_path()``) when it exists, else the embedded catalog."""
    env = os.environ.get("TALKPLAY_CATALOG")
    if env:
        return Path(env)
    user = user_catalog_path()
    return user if user.is_file() else embedded_catalog_path()


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/talkplay-edge (default ~/.cache/talkplay-edge): rebuilt artifacts such as GGUFs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "talkplay-edge"


def data_dir() -> Path:
    """$XDG_DATA_HOME/talkplay-edge (default ~/.local/share/talkplay-edge): the user's own catalog."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "talkplay-edge"


def default_model_path():
    """The embedded model's GGUF (built from the shipped delta on first use), or None if none ships.
    ``$TALKPLAY_QUANT`` picks the quantisation (default Q8_0; Q4_K_M is smaller for a Raspberry Pi)."""
    from .model_build import DEFAULT_FTYPE
    from .model_build import default_model_path as build_default

    return build_default(os.environ.get("TALKPLAY_QUANT") or DEFAULT_FTYPE)
