# The inventory example service (examples/python/inventory.py). Build from the repository root:
#   docker build -f examples/docker/inventory.Dockerfile -t ebpf-bridge/inventory:0.1.0 .
FROM python:3.11.9-slim-bookworm
WORKDIR /app
# The bridge helper needs only the standard library: install the package without extras.
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY sdk_side ./sdk_side
COPY kernel_side ./kernel_side
COPY bpf ./bpf
RUN pip install --no-cache-dir .
COPY examples/python/inventory.py ./
ENV PYTHONUNBUFFERED=1
EXPOSE 8082
CMD ["python", "inventory.py", "--port", "8082"]
