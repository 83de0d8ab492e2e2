# The pricing example service (examples/go/pricing: net/http plus h2c). Build from the
# repository root:
#   docker build -f examples/docker/pricing.Dockerfile -t ebpf-bridge/pricing:0.1.0 .
# Built as on the demo machine: GOPATH mode against Debian's golang.org/x/net, no module proxy.
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      golang-go golang-golang-x-net-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src/pricing
COPY examples/go/pricing/go.mod examples/go/pricing/main.go ./
RUN GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 go build -o /out/pricing .

FROM debian:bookworm-slim
COPY --from=build /out/pricing /usr/local/bin/pricing
EXPOSE 8083
CMD ["pricing", "--port", "8083"]
