# syntax=docker/dockerfile:1
# The rhio image: the node (`rhio`) and the client (`rhio-client`) on a small Debian runtime.
#
#   docker build -t registry.example.org/rhio/rhio:0.1.0 .
#
# k8s/ runs it as user 10001 with a read-only root filesystem; `python3 dev/k8s.py check` (run by
# ./dev/test) keeps this file and the manifests consistent (user, ports, binaries, Rust version).

# ---- build: the locked dependency set, the same toolchain as CI (rust-version in Cargo.toml)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The Python package (rhio-client/python) is a workspace member but not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --bin rhio --bin rhio-client \
 && mkdir -p /out \
 && cp target/release/rhio target/release/rhio-client /out/

# ---- runtime: glibc and CA certificates (TLS to S3, NATS and the registry use rustls with the
# system roots), nothing else
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rhio \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/rhio --create-home rhio
COPY --from=build /out/rhio /out/rhio-client /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/rhio
# 8080/tcp: /health, /health/live, /metrics; 9102/udp: QUIC to the other clusters' nodes
EXPOSE 8080/tcp 9102/udp
ENTRYPOINT ["rhio"]
CMD ["-c", "/etc/rhio/config.toml"]
