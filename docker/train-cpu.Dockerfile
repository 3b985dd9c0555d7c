# Top layer of the CPU test image kiln-train:cpu (docker/build-test-image.sh builds it; BASE is the dependency
# image that script imports). It mirrors the end of train.Dockerfile: the training code, a non-root user, the
# training module as entrypoint.
ARG BASE
FROM ${BASE}
COPY tasks /opt/kiln/kiln/tasks
# Compiled once here: the container user cannot write __pycache__ under /opt/kiln.
RUN ["python", "-m", "compileall", "-q", "/opt/kiln/kiln"]
ENV PYTHONPATH=/opt/kiln PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/kiln
USER 1000:0
ENTRYPOINT ["python", "-m", "kiln.tasks.training"]
CMD ["--help"]
