# The orders example service (examples/python/orders.py). Build from the repository root:
#   docker build -f examples/docker/orders.Dockerfile -t ebpf-bridge/orders:0.1.0 .
FROM python:3.11.9-slim-bookworm
WORKDIR /app
# The bridge helper needs only the standard library: install the package without extras. The
# service's own clients (PostgreSQL, Redis, HTTP/2) come from PyPI.
# setup.py names the optional C accelerator of the SDK's map write (sdk_side/_fastbpf.c);
# this image has no C compiler, so pip skips it and the SDK uses ctypes (about 0.5 us more
# per annotate). Install gcc and libc6-dev before pip to get it.
COPY pyproject.toml README.md setup.py ./
COPY bridge ./bridge
COPY sdk_side ./sdk_side
COPY kernel_side ./kernel_side
COPY bpf ./bpf
RUN pip install --no-cache-dir . "httpx[http2]>=0.27" "psycopg[binary]>=3.1" "redis>=5"
COPY examples/python/orders.py ./
ENV PYTHONUNBUFFERED=1
EXPOSE 8081
CMD ["python", "orders.py", "--port", "8081", "--inventory", "http://127.0.0.1:8082", \
     "--pricing", "http://127.0.0.1:8083", \
     "--postgres", "host=postgres port=5432 user=postgres password=example dbname=shop", \
     "--redis", "redis://redis:6379/0"]
