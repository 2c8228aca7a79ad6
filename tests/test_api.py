"""The package's public API: every name in __all__ resolves, and importing rvhub stays light."""

import subprocess
import sys

import rvhub


def test_every_public_name_resolves():
    for name in rvhub.__all__:
        assert getattr(rvhub, name) is not None, name
    from rvhub.apply import apply
    from rvhub.extract import extract

    assert rvhub.extract_vector is extract and rvhub.apply_vector is apply


def test_import_does_not_load_torch():
    code = "import sys, rvhub; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
