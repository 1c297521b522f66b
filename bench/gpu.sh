#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, on a machine with one CUDA device and no Rust
# toolchain: build here with `cargo build --release --no-default-features --features cuda` (no
# OpenBLAS needed there; and, for the numeric tests, `cargo test --release --no-default-features
# --features cuda --no-run --test gradients --test training --test invertibility`), copy the
# binaries over.
#
#   REWIND=./rewind TESTS="./gradients-<hash> ./training-<hash>" bench/gpu.sh [results-dir]
#
# Needs the default model and the chitchat dataset pulled into $REWIND_MODELS_DIR (or ./models)
# for the real-model steps. Each step has its own time limit and log; a failing step does not stop
# the others. Device time is scarce: STEPS picks the steps, in the order listed (default: all),
# e.g. STEPS="convert_unit tests" runs the |a| = 1 conversion first. CONVERT_TOKENS sets that
# conversion's distillation tokens per stage; a run cut short by its time limit resumes from the
# checkpoint in the output directory when started again.
set -u
REWIND=${REWIND:?set REWIND to a --features cuda build of rewind}
OUT=${1:-gpu-results}
mkdir -p "$OUT"
export RUST_LOG=${RUST_LOG:-info}

step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$OUT/summary.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/summary.log"

tests() {
    for test in ${TESTS:-}; do
        name=$(basename "$test")
        step "test-${name%%-*}" 300 env REWIND_TEST_DEVICE=cuda "$test" --test-threads 1 --nocapture
    done
}

# The synthetic decoder of the PyTorch reference numbers in docs/benchmarks.md.
bench_synthetic() {
    step bench_depth 300 "$REWIND" bench train --cuda --format bf16 --depths 8,96 --batch 4 \
        --seq 1024 --steps 3 --budget-gib 80 --exact --json
    step bench_batch 300 "$REWIND" bench train --cuda --format bf16 --depths 96 --batch 64 \
        --seq 1024 --steps 2 --strategies reversible --budget-gib 80 --json
}

# Fine-tuning SmolLM2-135M.
bench_real() {
    step bench_real 120 "$REWIND" bench train --real-model --model smollm2-135m-instruct --cuda \
        --format bf16 --batch 16 --seq 256 --steps 3 --budget-gib 80 --exact --json
}

# Conversion throughput at the default model's recipe (the last step's tokens/s in the log).
convert() {
    step convert 300 "$REWIND" convert --cuda --stages 3 --tokens 65536 --batch-size 16 \
        --seq-len 256 --output "$OUT/converted.delta"
}

# Conversion to the |a| = 1 end point: a = -1/8, -1/4, -1/2, -1, LoRA adapters on every
# projection (a delta of ~20 MB); `rewind convert` writes its eval report when it finishes.
convert_unit() {
    step convert_unit 480 "$REWIND" convert --cuda --weights lora --stages 3,2,1,0 \
        --tokens "${CONVERT_TOKENS:-500000}" --batch-size 16 --seq-len 256 \
        --output "$OUT/converted-unit.delta"
}

for name in ${STEPS:-tests bench_synthetic bench_real convert convert_unit}; do
    "$name"
done
