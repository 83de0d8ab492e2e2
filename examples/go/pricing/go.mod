// The pricing example as a Go module, for building it the usual way elsewhere
// (go mod tidy && go build). examples/build.sh and pricing.Dockerfile build it in GOPATH mode
// (GO111MODULE=off, which ignores this file) against Debian's golang-golang-x-net-dev 0.7.0,
// so the demo needs no module proxy; the version required here is that one.
module example.com/ebpf-bridge/pricing

go 1.19

require golang.org/x/net v0.7.0
