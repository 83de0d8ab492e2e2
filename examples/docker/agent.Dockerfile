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
# --system-site-packages: the venv sees Debian's BCC module.
RUN python3 -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[agent]"
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["ebpf-bridge", "agent"]
