# The orders example service (examples/python/orders.py). Build from the repository root:
#   docker build -f examples/docker/orders.Dockerfile -t ebpf-bridge/orders:0.1.0 .
FROM python:3.11.9-slim-bookworm
WORKDIR /app
# The bridge helper needs only the standard library: install the package without extras.
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY sdk_side ./sdk_side
COPY kernel_side ./kernel_side
COPY bpf ./bpf
RUN pip install --no-cache-dir .
COPY examples/python/orders.py ./
ENV PYTHONUNBUFFERED=1
EXPOSE 8081
CMD ["python", "orders.py", "--port", "8081", "--inventory", "http://127.0.0.1:8082"]
