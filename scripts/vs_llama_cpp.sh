#!/usr/bin/env bash
# rvq-kv against llama.cpp's llama-bench on the same GGUF file, threads and depths, in one run:
# prefill of a CTX-token prompt, decode speed after 0 (64), 1K and 8K tokens of context.
#
#   scripts/vs_llama_cpp.sh [--model smollm2|gemma3-270m|FILE] [--cache SPEC]... [--depths 64,1024,8192]
#
# llama.cpp is built once from the source vendored in PyPI's llama-cpp-python sdist (about 15
# minutes on 2 cores) into $RVQ_KV_HOME/llama.cpp; it is never a dependency of the build or tests.
# Our caches are given with --cache (default: f16); llama.cpp runs its f16 and q4_0 caches.
# Prints one markdown table of tokens/s and the ratios rvq-kv / llama.cpp; --json prints the
# numbers as one JSON object instead.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR="${RVQ_KV_HOME:-.rvq-kv}"
MODEL=smollm2
DEPTHS=64,1024,8192
PROMPT=512
THREADS=2
JSON=0
CACHES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --cache) CACHES+=("$2"); shift 2 ;;
    --depths) DEPTHS="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --json) JSON=1; shift ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "vs_llama_cpp: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ ${#CACHES[@]} -gt 0 ]] || CACHES=(f16)

LLAMA="$HOME_DIR/llama.cpp"
BENCH_BIN="$LLAMA/src/vendor/llama.cpp/build/bin/llama-bench"
if [[ ! -x "$BENCH_BIN" ]]; then
  echo "vs_llama_cpp: building llama-bench from llama-cpp-python 0.3.36's vendored llama.cpp into $LLAMA (once, ~15 min)" >&2
  mkdir -p "$LLAMA"
  python3 -m venv "$LLAMA/venv"
  "$LLAMA/venv/bin/pip" install --quiet scikit-build-core cmake ninja
  "$LLAMA/venv/bin/pip" download --quiet llama-cpp-python==0.3.36 --no-deps --no-binary llama-cpp-python \
    --no-build-isolation -d "$LLAMA/sdist"
  rm -rf "$LLAMA/src" && mkdir -p "$LLAMA/src"
  tar xzf "$LLAMA"/sdist/llama_cpp_python-0.3.36.tar.gz -C "$LLAMA/src" --strip-components=1
  (
    cd "$LLAMA/src/vendor/llama.cpp"
    PATH="$OLDPWD/$LLAMA/venv/bin:$PATH"
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -G Ninja >/dev/null
    cmake --build build --target llama-bench llama-perplexity >/dev/null
  )
fi

cargo build --release --quiet
RVQ=target/release/rvq-kv
# The model file both tools read.
case "$MODEL" in
  smollm2) $RVQ fetch model >&2; GGUF=$(ls "$HOME_DIR"/models/SmolLM2-135M-Instruct.Q4_1.gguf) ;;
  gemma3-270m|gemma3) $RVQ fetch gemma >&2; GGUF=$(ls "$HOME_DIR"/models/gemma-3-270m-q4_k_m.gguf) ;;
  *) GGUF="$MODEL" ;;
esac

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "vs_llama_cpp: llama-bench -t $THREADS -fa 1 -p $PROMPT -n 32 -d 0,$DEPTHS (f16 and q4_0 caches)" >&2
for kv in f16 q4_0; do
  "$BENCH_BIN" -m "$GGUF" -t "$THREADS" -fa 1 -p "$PROMPT" -n 32 -r 3 -d "0,$DEPTHS" -ctk $kv -ctv $kv \
    -o json > "$OUT/llama-$kv.json"
done
CACHE_ARGS=()
for c in "${CACHES[@]}"; do CACHE_ARGS+=(--cache "$c"); done
echo "vs_llama_cpp: rvq-kv bench ${CACHE_ARGS[*]} --ctx $DEPTHS" >&2
RAYON_NUM_THREADS=$THREADS $RVQ bench --model "$MODEL" "${CACHE_ARGS[@]}" --ctx "$DEPTHS" \
  --decode-steps 32 --json > "$OUT/ours.json"

python3 - "$OUT/llama-f16.json,$OUT/llama-q4_0.json" "$OUT/ours.json" "$PROMPT" "$JSON" <<'EOF'
import json, sys
llama = [r for path in sys.argv[1].split(",") for r in json.load(open(path))]
ours = json.load(open(sys.argv[2]))["rows"]
prompt, as_json = int(sys.argv[3]), sys.argv[4] == "1"

def peer(cache, depth, kind):
    """llama-bench's tokens/s: kind 'pp' (prompt of `prompt` tokens at depth 0) or 'tg'."""
    for r in llama:
        if r.get("type_k") != cache or r.get("n_depth", 0) != depth:
            continue
        if kind == "pp" and r["n_prompt"] > 0 and r["n_gen"] == 0:
            return r["avg_ts"]
        if kind == "tg" and r["n_gen"] > 0 and r["n_prompt"] == 0:
            return r["avg_ts"]
    return None

rows = []
for r in ours:
    f16_tg = peer("f16", r["ctx"], "tg")
    q4_tg = peer("q4_0", r["ctx"], "tg")
    rows.append({
        "cache": r["cache"], "ctx": r["ctx"],
        "decode_tokens_per_s": r["decode_tokens_per_s"],
        "llama_cpp_f16_decode": f16_tg, "llama_cpp_q4_0_decode": q4_tg,
        "decode_vs_llama_cpp_f16": r["decode_tokens_per_s"] / f16_tg if f16_tg else None,
        "decode_vs_llama_cpp_q4_0": r["decode_tokens_per_s"] / q4_tg if q4_tg else None,
        "prefill_tokens_per_s": r["prefill_tokens_per_s"],
        "peak_rss_bytes": r.get("peak_rss_bytes"),
    })
pp = peer("f16", 0, "pp")
tg0 = peer("f16", 0, "tg")
if as_json:
    print(json.dumps({"llama_cpp_pp": pp, "prompt": prompt, "llama_cpp_f16_decode_depth0": tg0,
                      "rows": rows}, indent=2))
    sys.exit(0)
print(f"llama.cpp: pp{prompt} {pp:.1f} tok/s, tg32 at depth 0 {tg0:.1f} tok/s (f16 cache)")
print("| cache | ctx | rvq-kv decode tok/s | llama.cpp f16 | × | llama.cpp q4_0 | × | rvq-kv prefill tok/s (ctx prompt) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
fmt = lambda v, f: "n/a" if v is None else format(v, f)
for r in rows:
    print(f"| {r['cache']} | {r['ctx']} | {r['decode_tokens_per_s']:.1f} | "
          f"{fmt(r['llama_cpp_f16_decode'], '.1f')} | {fmt(r['decode_vs_llama_cpp_f16'], '.2f')} | "
          f"{fmt(r['llama_cpp_q4_0_decode'], '.1f')} | {fmt(r['decode_vs_llama_cpp_q4_0'], '.2f')} | "
          f"{r['prefill_tokens_per_s']:.1f} |")
EOF
