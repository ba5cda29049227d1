# PNS container image: a static-ish Rust binary on a distroless base, run as
# a non-root user. Build: docker build -t pns .
# Run:   docker run -p 8080:8080 -v pns-data:/var/lib/pns pns
# (publish 8081, the internal listener, only on a private network).

# --- build -----------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# No debug info in the image's binary; strip it.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols

# Dependencies first, in a layer of their own that survives source edits.
# The load tool is a workspace member: its manifest must be there too.
COPY Cargo.toml Cargo.lock ./
COPY ops/load/Cargo.toml ops/load/Cargo.toml
RUN mkdir -p src tests/e2e ops/load/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > ops/load/src/main.rs \
 && touch src/lib.rs tests/e2e/main.rs \
 && cargo build --release --locked --bin pns \
 && rm -rf src tests

COPY src src
COPY migrations migrations
COPY web web
COPY tests tests
# The real sources are newer than the stub's build outputs.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin pns \
 && install -D -m 0755 target/release/pns /out/pns \
 && install -d -m 0700 /out/data

# --- run -------------------------------------------------------------------
# glibc and libgcc, no shell, no package manager; user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/pns /usr/local/bin/pns
COPY --from=build --chown=65532:65532 /out/data /var/lib/pns
ENV PNS_LISTEN=0.0.0.0:8080 \
    PNS_INTERNAL_LISTEN=0.0.0.0:8081 \
    PNS_DATABASE_URL=sqlite:///var/lib/pns/pns.db \
    PNS_DATA_DIR=/var/lib/pns \
    PNS_LOG=info
VOLUME ["/var/lib/pns"]
EXPOSE 8080 8081
USER 65532:65532
# Probe /healthz and /readyz from the orchestrator: the image has no shell
# or curl to run a HEALTHCHECK with.
ENTRYPOINT ["/usr/local/bin/pns"]
CMD ["serve"]
