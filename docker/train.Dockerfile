# Production training image: CUDA PyTorch plus the kiln training code; the Docker launcher runs one container per
# leased node (it overrides the entrypoint with torchrun). Build from the repository root on a builder that can
# pull the base image, then push it where the GPU nodes pull from:
#   docker build -f docker/train.Dockerfile -t registry.example.com/ml/kiln-train:<version> .
# Not buildable on the CI machines (no registry); those run the CPU stand-in from docker/build-test-image.sh.
ARG BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The base brings Python and a CUDA build of torch; the lock pins everything else to the versions CI tests
# (torch==2.13.0 in the lock also matches the base's 2.13.0+cuXXX, so pip keeps it).
COPY requirements.lock docker/train-requirements.txt /tmp/req/
RUN python -c "import sys, torch; v = sys.version_info[:2]; assert v == (3, 11), f'kiln needs Python 3.11, the base has {v}'; assert torch.__version__.split('+')[0] == '2.13.0', f'the base has torch {torch.__version__}, the lock pins 2.13.0'" \
 && pip install -c /tmp/req/requirements.lock -r /tmp/req/train-requirements.txt \
 && rm -rf /tmp/req

# uid 1000 in the root group: the launcher runs containers as 1000:0 when it runs as root itself, and the root group
# is how a container with an arbitrary uid reaches group-writable mounts (it grants no privilege).
RUN useradd --uid 1000 --gid 0 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kiln

COPY tasks /opt/kiln/kiln/tasks
# Compiled once here: the container user cannot write __pycache__ under /opt/kiln (nor anywhere: the launcher
# mounts the root filesystem read-only).
RUN python -m compileall -q /opt/kiln/kiln
ENV PYTHONPATH=/opt/kiln
WORKDIR /opt/kiln
USER 1000:0
# `docker run IMAGE --config cfg.json` trains as one process (world size 1); the launcher runs torchrun instead.
ENTRYPOINT ["python", "-m", "kiln.tasks.training"]
CMD ["--help"]
