# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian with
# CA certificates (HTTP actions use the system trust store) and nothing else.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml build.rs ./
COPY src src
COPY migrations migrations
COPY tests tests
COPY bench bench
RUN cargo build --release --locked --bin cronguard \
 && cp target/release/cronguard /usr/local/bin/cronguard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin cronguard \
 && mkdir -p /data && chown cronguard:cronguard /data
COPY --from=build /usr/local/bin/cronguard /usr/local/bin/cronguard

USER cronguard
WORKDIR /data
VOLUME ["/data"]
# Listening on all interfaces requires API tokens: pass CRONGUARD_TOKENS
# (or mount a file and set CRONGUARD_TOKENS_FILE); see docs/security.md.
ENV CRONGUARD_LISTEN=0.0.0.0:8080 \
    CRONGUARD_DATABASE=sqlite:///data/cronguard.db \
    CRONGUARD_LOG_FORMAT=json
EXPOSE 8080
# cronguard is PID 1: it handles SIGTERM/SIGINT itself (graceful drain, a
# second signal kills every run) and needs no init wrapper.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/cronguard", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/cronguard"]
CMD ["serve"]
