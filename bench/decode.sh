#!/usr/bin/env bash
# Generation side by side with llama.cpp on the same GGUF, threads, prompt and decode lengths.
# Builds llama.cpp from the source its PyPI sdist vendors (cached outside the repository), runs
# both interleaved ROUNDS times and prints each side's median and the ratio.
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
