# mantlegate's container image: the gateway binary alone on distroless (glibc, CA certificates, no shell), run as
# an unprivileged user. Build: `docker build -t mantlegate .`
#
# The runtime contract, which tests/sdk/test_runtime_contract.py checks on the release binary itself:
# - config from a mount at /etc/mantlegate/mantlegate.toml (or --config / MANTLEGATE_CONFIG), each setting
#   overridable by MANTLEGATE__SECTION__KEY, the upstream key from a mounted file or an env var;
# - nothing written anywhere but `metering.ledger_path` when one is set (mount a volume at /var/lib/mantlegate),
#   so the root filesystem can be read-only;
# - traffic on 8080, /healthz /readyz /metrics on 9091; no HEALTHCHECK: the orchestrator's probes use those;
# - SIGTERM drains (stops accepting, lets streams finish for `server.shutdown_grace`), SIGHUP reloads the config.

# --- build ------------------------------------------------------------------------------------------------------
# The toolchain the crate's rust-version names, on the same Debian release as the runtime image (same glibc).
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked --bin mantlegate \
    && install -D --strip target/release/mantlegate /out/mantlegate

# --- runtime ----------------------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mantlegate /usr/local/bin/mantlegate
# No config is baked in: mount one (a ConfigMap) here.
ENV MANTLEGATE_CONFIG=/etc/mantlegate/mantlegate.toml
# distroless's nonroot user; Kubernetes' runAsNonRoot needs it numeric.
USER 65532:65532
EXPOSE 8080 9091
ENTRYPOINT ["/usr/local/bin/mantlegate"]
CMD ["serve"]
