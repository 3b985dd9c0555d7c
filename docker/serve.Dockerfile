# Serving image (for the serving issue, not yet written): CPU PyTorch plus the kiln code, running
# `python -m tasks.serve`. NOTE: tasks/serve.py does not exist yet; this file fixes the image's shape (base, pinned
# dependencies, non-root user, entrypoint) so that the serving work only adds the module and its dependencies.
# Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t registry.example.com/ml/kiln-serve:<version> .
# Not buildable on the CI machines (no registry).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.lock docker/train-requirements.txt /tmp/req/
# The CPU build of torch from PyTorch's index (PyPI's default Linux wheel is the CUDA one, GBs larger); the model
# loader needs the same libraries as training. The HTTP server (fastapi, uvicorn) is pinned by the lock too.
RUN pip install -c /tmp/req/requirements.lock --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c /tmp/req/requirements.lock -r /tmp/req/train-requirements.txt fastapi uvicorn \
 && rm -rf /tmp/req

RUN useradd --uid 1000 --gid 0 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kiln
COPY tasks /opt/kiln/tasks
RUN python -m compileall -q /opt/kiln/tasks
ENV PYTHONPATH=/opt/kiln
WORKDIR /opt/kiln
USER 1000:0
EXPOSE 8080
ENTRYPOINT ["python", "-m", "tasks.serve"]
