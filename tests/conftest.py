import json
import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub: fail at once instead of retrying for ~20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def code_tree(tmp_path_factory) -> Path:
    """~80 real stdlib modules, some prefixed with a data-science import so the course's filter keeps them."""
    root = tmp_path_factory.mktemp("code")
    stdlib = Path(json.__file__).parent.parent
    files = [
        f
        for pkg in ("json", "email", "unittest", "logging", "http")
        for f in sorted((stdlib / pkg).glob("*.py"))
    ]
    for i, src in enumerate(files):
        text = src.read_text(encoding="utf-8")
        prefix = "import pandas as pd\nimport matplotlib.pyplot as plt\n" if i % 4 else ""
        (root / f"m{i:03d}_{src.name}").write_text(prefix + text, encoding="utf-8")
    return root
