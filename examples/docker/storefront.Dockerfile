# The storefront example service (examples/node/storefront, Node's http module, no npm
# dependencies). Build from the repository root:
#   docker build -f examples/docker/storefront.Dockerfile -t ebpf-bridge/storefront:0.1.0 .
FROM node:20.18.0-bookworm-slim
WORKDIR /app
COPY examples/node/storefront/package.json examples/node/storefront/server.js ./
EXPOSE 8080
CMD ["node", "server.js", "--port", "8080", "--orders", "http://127.0.0.1:8081"]
