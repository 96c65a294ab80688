# syntax=docker/dockerfile:1
# One image for every freshrec component; the command picks the role:
#   docker run IMAGE trainer | service | joiner | replay synthetic --events 100000
#
# Two stages: the builder installs into a virtualenv (CPU-only torch first, so the project's
# "torch>=2.4" is already satisfied and pip never pulls a multi-GB CUDA build); the runtime stage
# copies only that virtualenv onto a fresh slim base, leaving pip caches and build files behind.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv
RUN python -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# Sources only (see .dockerignore): tests, benches, docs and deployment files stay out.
COPY pyproject.toml README.md ./
COPY freshrec ./freshrec
COPY featurestore ./featurestore
COPY trainer ./trainer
COPY joiner ./joiner
COPY service ./service
COPY bandit ./bandit
# Exactly the extras the benchmarks measure with (bench/__init__.py SHIPPED_EXTRAS): serve =
# uvloop + httptools, the service's event loop and HTTP parser.
RUN pip install ".[serve,train]" \
 && find "$VIRTUAL_ENV" -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM python:3.11-slim
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FRESHREC_DATA_DIR=/var/lib/freshrec \
    FRESHREC_TRAINER_CHECKPOINT_DIR=/var/lib/freshrec/checkpoints \
    FRESHREC_JOINER_CHECKPOINT_DIR=/var/lib/freshrec/joiner-checkpoints \
    FRESHREC_SERVICE_HOST=0.0.0.0 \
    NUMBA_CACHE_DIR=/var/cache/freshrec/numba
# A fixed non-root uid/gid, so volume ownership (compose volumes, k8s fsGroup) is predictable.
RUN groupadd --system --gid 10001 freshrec \
 && useradd --system --uid 10001 --gid freshrec --home-dir /var/lib/freshrec \
            --shell /usr/sbin/nologin freshrec \
# numba's @njit(cache=True) writes compiled code to NUMBA_CACHE_DIR: the venv is root's and
# read-only to uid 10001 (k8s mounts an emptyDir there, as its root filesystem is read-only).
 && mkdir -p /var/lib/freshrec/checkpoints /var/lib/freshrec/joiner-checkpoints \
             /var/cache/freshrec/numba \
 && chown -R freshrec:freshrec /var/lib/freshrec /var/cache/freshrec
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/freshrec
VOLUME ["/var/lib/freshrec"]
# service HTTP (+ /metrics), trainer metrics, joiner metrics
EXPOSE 8000 9101 9102
ENTRYPOINT ["freshrec"]
CMD ["service"]
