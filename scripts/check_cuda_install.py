"""Install the numba-cuda stack that `pip install ".[cuda13]"` resolves, in a fresh venv, and load it.

tests/test_packaging.py only resolves the extras (a dry run, cheap enough for CI). This goes one step
further, outside CI (a few minutes and a few hundred MB of wheels): it installs the resolved numba,
numba-cuda[cu13] and numpy into a throw-away venv of the given Python and imports numba-cuda's array
support (``numba.cuda.np.arrayobj``, where numpy 2.5 broke numba-cuda 0.30.4) and compiles a small
kernel to PTX, which needs no GPU.

    python scripts/check_cuda_install.py --python ~/.pyenv/versions/3.12.1/bin/python3.12
    python scripts/check_cuda_install.py --python ... --numpy 2.5.5   # shows the failure the bound avoids

Exit status 0 when the stack loads, 1 when it does not (the last line says why).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOAD_CHECK = """
import numpy, numba, numba.cuda.np.arrayobj
from numba import cuda
def add_ends(out, x):
    out[0] = x[0] + x[-1]
ptx, _ = cuda.compile_ptx(add_ends, "void(int32[:], int32[:])", cc=(9, 0))
print(f"numpy {numpy.__version__}, numba {numba.__version__}: numba-cuda's array support loads, PTX compiles")
"""


def resolved_versions(python: str, extra: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run([python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), f".[{extra}]"], cwd=REPO, check=True)
        return {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter to check (default: this one)")
    parser.add_argument("--extra", default="cuda13", choices=("cuda12", "cuda13"))
    parser.add_argument("--numpy", help="install this numpy instead of the resolved one")
    args = parser.parse_args()

    versions = resolved_versions(args.python, args.extra)
    numpy_version = args.numpy or versions["numpy"]
    binding = "cu13" if args.extra == "cuda13" else "cu12"
    pins = [f"numba-cuda[{binding}]=={versions['numba-cuda']}", f"numba=={versions['numba']}",
            f"numpy=={numpy_version}"]
    print(f"resolved for {args.python}: {', '.join(pins)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-cuda-stack-") as folder:
        subprocess.run([args.python, "-m", "venv", folder], check=True)
        python = str(Path(folder) / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", "--quiet", *pins], check=True)
        loaded = subprocess.run([python, "-c", LOAD_CHECK], capture_output=True, text=True, check=False)
    if loaded.returncode != 0:
        last = (loaded.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"FAILED: numba-cuda {versions['numba-cuda']} with numpy {numpy_version}: {last}")
        return 1
    print(loaded.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
