# syntax=docker/dockerfile:1
# eventflow container image: a cached dependency layer, a release build, and a
# distroless runtime (no shell, non-root). Build: docker build -t eventflow:local .

# ---- builder ---------------------------------------------------------------
# 1.88 is the crate's declared rust-version (Cargo.toml), so this also keeps the MSRV honest.
FROM rust:1.88-bookworm AS builder
WORKDIR /build

# Dependencies first: build them against stub targets so this layer is reused
# until Cargo.toml or Cargo.lock change. Every target the manifest declares
# explicitly needs a stub here (today: the two bins and the "pipeline" bench).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/loadgen benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/loadgen/main.rs \
    && echo '' > src/lib.rs \
    && echo 'fn main() {}' > benches/pipeline.rs \
    && cargo build --release --locked \
    && rm -rf src benches

# The real sources. Touch them so cargo sees them as newer than the stub build.
COPY src ./src
COPY benches ./benches
RUN find src benches -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin eventflow --bin eventflow-loadgen

# ---- runtime ---------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /build/target/release/eventflow /usr/local/bin/eventflow
# The load generator rides along for the compose `load` profile.
COPY --from=builder /build/target/release/eventflow-loadgen /usr/local/bin/eventflow-loadgen
# 65532 is distroless's "nonroot" user and group. Numeric, so Kubernetes
# runAsNonRoot can verify it (and hadolint DL3066 is satisfied).
USER 65532:65532
EXPOSE 8080
ENV EVENTFLOW__SERVER__ADDR=0.0.0.0:8080
# `eventflow healthcheck` GETs /healthz on the configured port and exits 0/1
# (distroless has no shell, curl or wget).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/eventflow", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/eventflow"]
