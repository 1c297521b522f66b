#!/usr/bin/env bash
# Generation side by side with llama.cpp on the same GGUF, threads, prompt and decode lengths.
# Builds llama.cpp from the source its PyPI sdist vendors (cached outside the repository), makes
# an F32 copy of each GGUF with llama.cpp's own quantize tool, runs both engines interleaved
# ROUNDS times (prefill at each prompt length, decode at batch 1 and BATCH) and prints each
# side's median and the ratio. Needs jq.
#
#   bench/decode.sh [MODEL.gguf ...]        default: models/SmolLM2-135M-Instruct.Q4_1.gguf
#   env: THREADS (2), ROUNDS (3), PROMPTS ("128 512"), DECODE (64), BATCH (8),
#        LLAMA_CACHE (~/.cache/rewind-bench/llama.cpp), REWIND (target/release/rewind)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
PROMPTS=${PROMPTS:-"128 512"}
DECODE=${DECODE:-64}
BATCH=${BATCH:-8}
LLAMA_CACHE=${LLAMA_CACHE:-$HOME/.cache/rewind-bench/llama.cpp}
REWIND=${REWIND:-target/release/rewind}
LLAMA_VERSION=0.3.36

build_llama() {
  local bin=$LLAMA_CACHE/build/bin
  if [[ -x $bin/llama-bench && -x $bin/llama-batched-bench ]]; then return; fi
  echo "building llama.cpp (llama-cpp-python $LLAMA_VERSION sdist) in $LLAMA_CACHE" >&2
  mkdir -p "$LLAMA_CACHE" && cd "$LLAMA_CACHE"
  [[ -x venv/bin/cmake ]] || { python3 -m venv venv && venv/bin/pip install -q cmake ninja scikit-build-core; }
  if [[ ! -d src/vendor/llama.cpp ]]; then
    venv/bin/pip download -q --no-deps --no-build-isolation --no-binary llama-cpp-python -d sdist \
      "llama-cpp-python==$LLAMA_VERSION"
    mkdir -p src && tar -xzf sdist/*.tar.gz -C src --strip-components=1
  fi
  # AMX is compiled out: the Intel machines of this kind report it in cpuid but fault on it.
  local no_amx='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
  PATH=$PWD/venv/bin:$PATH cmake -S src/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" >/dev/null
  PATH=$PWD/venv/bin:$PATH ninja -C build -j"$(nproc)" llama-bench llama-batched-bench llama-quantize >/dev/null
  cd - >/dev/null
}

build_llama
[[ ${1:-} == --build-only ]] && exit 0

LLAMA_BIN=$LLAMA_CACHE/build/bin
[[ -x $REWIND ]] || cargo build --release --locked
MODELS=("$@")
[[ ${#MODELS[@]} -gt 0 ]] || MODELS=(models/SmolLM2-135M-Instruct.Q4_1.gguf)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
llama() { LD_LIBRARY_PATH=$LLAMA_BIN "$LLAMA_BIN/$1" "${@:2}" 2>/dev/null; }

for model in "${MODELS[@]}"; do
  name=$(basename "$model" .gguf)
  # The f32 comparison: llama.cpp on an F32 copy of the same values, rewind dequantising.
  f32=$LLAMA_CACHE/$name.F32.gguf
  [[ -f $f32 ]] || llama llama-quantize --allow-requantize "$model" "$f32" F32 >/dev/null
  for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS: $name" >&2
    for format in quantized f32; do
      gguf=$model; [[ $format == f32 ]] && gguf=$f32
      for p in $PROMPTS; do
        llama llama-bench -m "$gguf" -t "$THREADS" -p "$p" -n 0 -r 1 -o jsonl |
          jq -c --arg m "$name" --arg f "$format" --argjson p "$p" \
            '{model:$m,format:$f,engine:"llama.cpp",metric:"prefill \($p)",value:.avg_ts}'
        RAYON_NUM_THREADS=$THREADS "$REWIND" bench generate --model "$model" --formats "$format" \
          --prompt-tokens "$p" --decode-tokens 1 --batches 1 --json 2>/dev/null |
          jq -c --arg m "$name" --arg f "$format" --argjson p "$p" \
            '{model:$m,format:$f,engine:"rewind",metric:"prefill \($p)",value:.prefill_tokens_per_s}'
      done
      llama llama-batched-bench -m "$gguf" -t "$THREADS" -c 4096 -npp 128 -ntg "$DECODE" \
        -npl "1,$BATCH" --output-format jsonl |
        jq -c --arg m "$name" --arg f "$format" \
          '{model:$m,format:$f,engine:"llama.cpp",metric:"decode batch \(.pl)",value:.speed_tg}'
      RAYON_NUM_THREADS=$THREADS "$REWIND" bench generate --model "$model" --formats "$format" \
        --prompt-tokens 128 --decode-tokens "$DECODE" --batches "1,$BATCH" --json 2>/dev/null |
        jq -c --arg m "$name" --arg f "$format" \
          '{model:$m,format:$f,engine:"rewind",metric:"decode batch \(.batch)",value:.decode_tokens_per_s}'
    done
  done >>"$OUT/rows.jsonl"
done

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $THREADS threads, $ROUNDS rounds, medians (tokens/s)"
jq -rs '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  group_by([.model, .format, .metric]) | map({
      model: .[0].model, format: .[0].format, metric: .[0].metric,
      rewind: (map(select(.engine == "rewind").value) | median),
      llama: (map(select(.engine == "llama.cpp").value) | median)})
  | (["model", "weights", "metric", "rewind", "llama.cpp", "ratio"] | join(" | ")),
    (.[] | [.model, (if .format == "quantized" then "GGUF blocks" else "F32" end), .metric,
            (.rewind | floor | tostring), (.llama | floor | tostring),
            ((.rewind / .llama * 100 | round) / 100 | tostring + "x")] | join(" | "))
' "$OUT/rows.jsonl"
