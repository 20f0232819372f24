# syntax=docker/dockerfile:1
# Container images of the eventflow workspace: a cached dependency layer, a
# release build, and distroless runtimes (no shell, non-root).
#   docker build -t eventflow:local .                                  the service (the default, last stage)
#   docker build --target loadgen -t eventflow-loadgen:local .         the load generator
# The service image carries only `eventflow`.

# ---- builder ---------------------------------------------------------------
# 1.89 is the workspace's declared rust-version (Cargo.toml), so this also keeps the MSRV honest.
FROM rust:1.89-bookworm AS builder
WORKDIR /build

# Dependencies first: build them against stub targets so this layer is reused
# until a manifest or Cargo.lock changes. Every target the manifests declare
# explicitly needs a stub here (today: the two bins and the "pipeline" bench).
COPY Cargo.toml Cargo.lock ./
COPY loadgen/Cargo.toml ./loadgen/
RUN mkdir -p src benches loadgen/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo '' > src/lib.rs \
    && echo 'fn main() {}' > benches/pipeline.rs \
    && echo 'fn main() {}' > loadgen/src/main.rs \
    && cargo build --release --locked --workspace --bins \
    && rm -rf src benches loadgen/src

# The real sources. Touch them so cargo sees them as newer than the stub build.
COPY src ./src
COPY benches ./benches
COPY loadgen/src ./loadgen/src
RUN find src benches loadgen/src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin eventflow --bin eventflow-loadgen

# ---- load generator (docker compose --profile load) ------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS loadgen
COPY --from=builder /build/target/release/eventflow-loadgen /usr/local/bin/eventflow-loadgen
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/eventflow-loadgen"]

# ---- service (the default target) ------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS service
COPY --from=builder /build/target/release/eventflow /usr/local/bin/eventflow
# 65532 is distroless's "nonroot" user and group. Numeric, so Kubernetes
# runAsNonRoot can verify it (and hadolint DL3066 is satisfied).
USER 65532:65532
# The API on 8080 (server.addr's default); health, readiness and metrics on
# the admin listener, 8081, which is not published with the API. Set
# EVENTFLOW__SERVER__ADMIN_ADDR empty to serve everything on 8080.
ENV EVENTFLOW__SERVER__ADMIN_ADDR=0.0.0.0:8081
EXPOSE 8080 8081
# `eventflow healthcheck` GETs /healthz on the admin listener (server.addr
# when there is none) and exits 0/1: distroless has no shell, curl or wget.
# The service writes no file: run it with a read-only root filesystem
# (docker run --read-only; compose's read_only; Kubernetes'
# readOnlyRootFilesystem).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/eventflow", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/eventflow"]
