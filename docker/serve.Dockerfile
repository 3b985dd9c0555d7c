# Production serving image: CPU PyTorch plus the kiln code, running the model server `python -m kiln.tasks.serving`.
# Build from the repository root on a builder that can pull the base image, then push it where the serving hosts
# pull from:
#   docker build -f docker/serve.Dockerfile -t registry.example.com/ml/kiln-serve:<version> .
# Run it with the bundles and the deployment file mounted read-only and the token in the environment (a secret,
# never a build argument):
#   docker run -p 8765:8765 -v /srv/kiln/bundles:/srv/kiln/bundles:ro -v /srv/kiln/deploy:/deploy:ro \
#     -e KILN_SERVE_TOKEN=... registry.example.com/ml/kiln-serve:<version> --deployment /deploy/deployment.json
# The deployment file names bundle folders as the container sees them. Not buildable on the CI machines (no
# registry); those run the CPU stand-in kiln-serve:cpu from docker/build-test-image.sh.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.lock docker/train-requirements.txt /tmp/req/
# The CPU build of torch from PyTorch's index (PyPI's default Linux wheel is the CUDA one, GBs larger); then the
# rest of the requirements, the HTTP server included (fastapi, uvicorn, uvloop, httptools, prometheus-client,
# orjson) and ONNX Runtime (a bundle's model.onnx), at the lock's versions (the lock's torch==2.13.0 also matches
# 2.13.0+cpu, so pip keeps it). A bundle's model.pt2 is a torch.export program: it needs torch, not the pipeline's
# code or code.requirements (a custom operator a requirement registers would not load here).
RUN python -c "import sys; v = sys.version_info[:2]; assert v == (3, 11), f'kiln needs Python 3.11, the base has {v}'" \
 && pip install -c /tmp/req/requirements.lock --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c /tmp/req/requirements.lock -r /tmp/req/train-requirements.txt \
 && rm -rf /tmp/req

# uid 1000 in the root group, as in the training image; it owns nothing in the image and can write only /tmp.
RUN useradd --uid 1000 --gid 0 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kiln

COPY tasks /opt/kiln/kiln/tasks
# Compiled once here: the container user cannot write __pycache__ under /opt/kiln.
RUN python -m compileall -q /opt/kiln/kiln
# The server listens on every interface of the container; a token generated when KILN_SERVE_TOKEN is unset (not
# recommended in a container: no client can read it) goes under /tmp.
ENV PYTHONPATH=/opt/kiln KILN_HOME=/tmp/kiln KILN_SERVE_HOST=0.0.0.0 KILN_SERVE_PORT=8765
WORKDIR /opt/kiln
USER 1000:0
EXPOSE 8765
# /health answers while the process serves; the port follows KILN_SERVE_PORT (set it rather than --port).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${KILN_SERVE_PORT}/health', timeout=2)" || exit 1
ENTRYPOINT ["python", "-m", "kiln.tasks.serving"]
CMD ["--help"]
