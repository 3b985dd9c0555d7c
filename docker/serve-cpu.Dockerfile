# Top layer of the CPU test image kiln-serve:cpu (docker/build-test-image.sh builds it on the same dependency base
# as kiln-train:cpu). It mirrors the end of serve.Dockerfile: the kiln code, a non-root user, the model server as
# entrypoint. Run it with the bundles and the deployment file mounted read-only and the token in the environment:
#   docker run -p 127.0.0.1:8765:8765 -v /bundles:/bundles:ro -v /deploy:/deploy:ro -e KILN_SERVE_TOKEN=... \
#     kiln-serve:cpu --deployment /deploy/deployment.json
ARG BASE
FROM ${BASE}
COPY tasks /opt/kiln/kiln/tasks
# Compiled once here: the container user cannot write __pycache__ under /opt/kiln.
RUN ["python", "-m", "compileall", "-q", "/opt/kiln/kiln"]
# In a container the server listens on every interface (the engine publishes the port); state (a generated token
# when KILN_SERVE_TOKEN is unset) goes under /tmp, the only place the container user may write.
ENV PYTHONPATH=/opt/kiln PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 KILN_HOME=/tmp/kiln \
    KILN_SERVE_HOST=0.0.0.0 KILN_SERVE_PORT=8765
WORKDIR /opt/kiln
USER 1000:0
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${KILN_SERVE_PORT}/health', timeout=2)" || exit 1
ENTRYPOINT ["python", "-m", "kiln.tasks.serving"]
CMD ["--help"]
