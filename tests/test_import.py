"""``import lorafx`` stays light: no triton, onnx, onnxruntime or transformers, and no CUDA init."""

import subprocess
import sys


def test_import_lorafx_is_light():
    code = (
        "import sys, lorafx, torch\n"
        "heavy = [m for m in ('triton', 'onnx', 'onnxruntime', 'onnxscript', 'transformers', 'peft') if m in sys.modules]\n"
        "print(heavy, torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False"


def test_cli_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "lorafx", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out
