# syntax=docker/dockerfile:1
# The operator's image: the operator (run, simulate, crd, proxy) and the
# sidecar's own small binary, on distroless, as the non-root user 65532.
# Build it with
#   docker build -t ghcr.io/saleslayer-operator/saleslayer-operator:0.1.0 .
# The chart (charts/saleslayer-operator) runs this image, and the webhook
# injects the same image as the pods' sidecar proxy.

FROM rust:1-bookworm AS build
WORKDIR /src
# Cargo reads every target the manifest names (benches, tests) before it
# builds one, so the whole source tree goes in; .dockerignore keeps target/ out.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p saleslayer-operator -p saleslayer-sidecar \
 && install -D target/release/saleslayer-operator /out/saleslayer-operator \
 && install -D target/release/saleslayer-sidecar /out/saleslayer-sidecar

# glibc-linked (ring's C and assembly), so the cc variant: glibc, libgcc,
# CA certificates, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/saleslayer-operator /usr/local/bin/saleslayer-operator
COPY --from=build /out/saleslayer-sidecar /usr/local/bin/saleslayer-sidecar
USER 65532:65532
EXPOSE 8080 8443 9443
ENTRYPOINT ["/usr/local/bin/saleslayer-operator"]
CMD ["run"]
