#!/usr/bin/env bash
# The paper's ablations and what it did not try, as one reproducible run:
#   1. calibrates one codebook file per training-time variant (skipped when the file exists),
#   2. runs every cache through `rvq-kv compare` on the same sotu-eval tokens at ctx 512 and 2048,
#   3. writes docs/data/ablation.md (table) and docs/data/ablation.svg (Δ PPL vs bits/element).
# Depth K is ablated by reading the first K stages of the 8-stage paper codebooks (`stages=K`):
# training is stage by stage, so they are exactly what a K-stage calibration learns.
# Usage: scripts/ablation.sh [max-tokens] [contexts]   (defaults 16384 and 512,2048: about 3 hours
# on 2 cores; `scripts/ablation.sh 8192 512` is the quick version, about 1 hour)
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS="${1:-16384}"
CONTEXTS="${2:-512,2048}"
HOME_DIR="${RVQ_KV_HOME:-.rvq-kv}"
BOOKS="$HOME_DIR/codebooks/ablation"
mkdir -p "$BOOKS"
cargo build --release --quiet
BIN=target/release/rvq-kv

calibrate() { # name, extra calibrate options...
  local name="$1"; shift
  if [[ -f "$BOOKS/$name.safetensors" ]]; then
    echo "ablation: $BOOKS/$name.safetensors exists, not recalibrating" >&2
  else
    "$BIN" calibrate --out "$BOOKS/$name.safetensors" "$@" >&2
  fi
}

calibrate paper
calibrate c256 -C 256
calibrate c1024 -C 1024
calibrate d64 -d 64
calibrate keys-contiguous --key-grouping contiguous
calibrate dead-codes --dead-code-threshold 0.1
calibrate rotate --rotate

P="$BOOKS/paper.safetensors"
"$BIN" compare \
  --cache q4_0,rot,post-rope --cache kivi2 \
  --rvq "$P,stages=1" --rvq "$P,stages=2" --rvq "$P,stages=4" --rvq "$P,stages=6" --rvq "$P" \
  --rvq "$BOOKS/c256.safetensors" --rvq "$BOOKS/c1024.safetensors" --rvq "$BOOKS/d64.safetensors" \
  --rvq "$BOOKS/keys-contiguous.safetensors" \
  --rvq "$P,only=k" --rvq "$P,only=v" \
  --rvq "$P,beam=2" \
  --rvq "$BOOKS/dead-codes.safetensors" \
  --rvq "$P,sinks=4" --rvq "$P,recent=32" --rvq "$P,sinks=4,recent=32" \
  --rvq "$BOOKS/rotate.safetensors" \
  --ctx "$CONTEXTS" --max-tokens "$TOKENS" --protocol llama.cpp \
  --report docs/data/ablation.md --plot docs/data/ablation.svg --json > docs/data/ablation.json
echo "ablation: wrote docs/data/ablation.md, docs/data/ablation.svg, docs/data/ablation.json" >&2
