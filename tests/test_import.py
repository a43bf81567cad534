import subprocess
import sys

OPTIONAL = ["torchvision", "timm", "transformers", "matplotlib", "onnx", "onnxruntime", "sklearn",
            "accelerate", "gguf", "mlxtend", "skimage"]


def test_import_pulls_no_optional_package():
    code = (
        "import sys, secateurs, secateurs.cli;"
        f"print([m for m in {OPTIONAL!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_is_exported():
    import secateurs

    for name in secateurs.__all__:
        assert hasattr(secateurs, name), name
    assert callable(secateurs.prune_) and callable(secateurs.finalize_)
