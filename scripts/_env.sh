# Shared by scripts/demo and scripts/test: create .venv and install freshrec into it.
# torch 2.13.0 (CPU) goes in first so that the project's "torch>=2.4" is already satisfied
# and pip never pulls a multi-GB CUDA build. Re-runs are fast: a stamp of pyproject.toml's
# hash skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
extras="${INSTALL_EXTRAS:-dev}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.freshrec-installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  rm -f .venv/.freshrec-installed-*
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
