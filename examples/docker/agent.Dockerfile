# The ebpf-bridge agent. Build from the repository root:
#   docker build -f examples/docker/agent.Dockerfile -t ebpf-bridge/agent:0.1.0 .
# BCC comes from Debian (python3-bpfcc; the PyPI "bcc" is unrelated). Kernel headers are NOT in
# the image: they must match the host kernel, so /lib/modules and /usr/src come from the host.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc bpfcc-tools libbpfcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ebpf-bridge
COPY pyproject.toml README.md setup.py ./
COPY bridge ./bridge
COPY sdk_side ./sdk_side
COPY kernel_side ./kernel_side
COPY bpf ./bpf
# --system-site-packages: the venv sees Debian's BCC module. The compiler and headers are there
# only for the build: they compile the agent's optional C parts (HTTP/1 parser, OTLP protobuf
# and JSON encoders: about 8 us less agent CPU per span) and are removed in the same layer.
# Without them the install still succeeds and the agent runs the pure-Python equivalents.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc libc6-dev python3-dev \
 && python3 -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[agent]" \
 && apt-get purge -y gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["ebpf-bridge", "agent"]
