#!/usr/bin/env bash
# The RVQ codec against faiss's ResidualQuantizer on the same data in the same run.
# Creates a virtual environment with faiss-cpu and numpy from PyPI (once, in $RVQ_KV_HOME),
# then runs `rvq-kv bench codec` with it. Extra arguments go to `rvq-kv bench codec`, e.g. --json.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR="${RVQ_KV_HOME:-.rvq-kv}"
VENV="$HOME_DIR/venv-faiss"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import faiss, numpy" 2>/dev/null; then
  echo "bench_codec: installing faiss-cpu and numpy into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet faiss-cpu numpy
fi
cargo build --release --quiet
exec target/release/rvq-kv bench codec --faiss-python "$VENV/bin/python" "$@"
