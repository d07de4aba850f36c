# The image that k8s/ runs: CUDA + cuDNN, a Python venv with torch built for that CUDA, Ray and
# longcat-dist installed from this repository at /app, running as the non-root user `ray` (uid 1000).
# Build and push (docs/CLUSTER.md, "Image"):
#   docker build -t registry.example.com/ml/longcat-dist:0.1.0 .
#   docker push registry.example.com/ml/longcat-dist:0.1.0
# The devel flavour is needed: DeepSpeed compiles its CUDA ops (fused Adam...) with nvcc on first use.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

# torch must match the base image's CUDA (cu128 = CUDA 12.8); pyproject allows torch 2.11 to 2.15.
ARG TORCH_VERSION=2.11.0
ARG TORCH_CUDA=cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/ray

# python3-dev and g++ for DeepSpeed's JIT ops; wget because KubeRay's default health probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev g++ wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04 images ship a user `ubuntu` with uid 1000; the manifests run as uid 1000 named `ray`.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray

RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip setuptools wheel packaging ninja \
    && pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}"

# DeepSpeed is a source package whose setup imports torch, so it is built against the torch above.
COPY k8s/image/constraints.txt /tmp/constraints.txt
RUN pip install --no-build-isolation -c /tmp/constraints.txt deepspeed

# The repository (.dockerignore leaves out data, outputs, tests and local environments). The editable
# install keeps configs/ next to the package, where longcat_dist looks for its default files.
WORKDIR /app
COPY . /app
RUN pip install -c /tmp/constraints.txt -e /app \
    && python -m compileall -q /app/longcat_dist /app/launch /app/sharding \
    && ray --version

# The root filesystem is mounted read-only in the cluster; Ray and the caches write to /tmp and $HOME,
# which the manifests mount as emptyDirs.
USER 1000:1000
CMD ["/bin/bash"]
