#!/usr/bin/env bash
# Build the CPU test images kiln-train:cpu and kiln-serve:cpu on a machine with no container registry.
#
# Three layers, each skipped when an image built from the same inputs exists:
#   kiln-train-base:<hash>  the dependencies: this machine's Python interpreter (its whole prefix, without the
#                           site-packages), the libraries it and the wheels link against (found with ldd), and a
#                           fresh `pip install` of docker/train-requirements.txt pinned by requirements.lock, from
#                           the same package sources `make install` uses. The rootfs is `docker import`ed: the
#                           container runs on its own filesystem, nothing of the host is mounted into it.
#                           The interpreter keeps its host path (RUNPATH and the pip-written scripts point there).
#   kiln-train:cpu          docker/train-cpu.Dockerfile on top: the tasks/ code, a non-root user, the entrypoint.
#                           Labelled kiln.input-hash=<hash of the base, the Dockerfile and the tasks/ sources>.
#   kiln-serve:cpu          docker/serve-cpu.Dockerfile on the same base: the tasks/ code, a non-root user, the
#                           model server as entrypoint. Labelled the same way with its own hash.
# The production images are docker/train.Dockerfile (CUDA base from a registry) and docker/serve.Dockerfile
# (python:3.11-slim from a registry); see docker/README.md.
#
# Usage: docker/build-test-image.sh [--check]
#   --check  exit 0 if both images are up to date with the sources, 1 (with the command to run) if not.
# Environment: PYTHON (default .venv/bin/python), IMAGE (default kiln-train:cpu), SERVE_IMAGE (default
# kiln-serve:cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=${IMAGE:-kiln-train:cpu}
SERVE_IMAGE=${SERVE_IMAGE:-kiln-serve:cpu}
LABEL=kiln.input-hash

prefix=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
base_hash=$( { cat docker/build-test-image.sh docker/train-requirements.txt requirements.lock
               echo "$prefix $("$PYTHON" -V) $(uname -m)"; } | sha256sum | cut -c1-16)
base=kiln-train-base:$base_hash
sources=$(find tasks -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
code_hash() { { echo "$base"; cat "$1"; echo "$sources"; } | sha256sum | cut -c1-16; }
hash=$(code_hash docker/train-cpu.Dockerfile)
serve_hash=$(code_hash docker/serve-cpu.Dockerfile)

current() { docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }
up_to_date() { [ "$(current "$IMAGE")" = "$hash" ] && [ "$(current "$SERVE_IMAGE")" = "$serve_hash" ]; }
if up_to_date; then
  [ "${1:-}" = --check ] || echo "$IMAGE and $SERVE_IMAGE are up to date ($LABEL=$hash, $serve_hash)"
  exit 0
fi
if [ "${1:-}" = --check ]; then
  for pair in "$IMAGE $hash" "$SERVE_IMAGE $serve_hash"; do
    set -- $pair
    found=$(current "$1")
    [ "$found" = "$2" ] && continue
    state="missing"
    [ -z "$found" ] || state="out of date ($LABEL=$found, the sources give $2)"
    echo "$1 is $state: run make docker-engine image" >&2
  done
  exit 1
fi
# One build at a time on this engine; a build that waited may find the images already made.
exec 9>"${TMPDIR:-/tmp}/kiln-build-test-image.lock"
flock 9
if up_to_date; then
  echo "$IMAGE and $SERVE_IMAGE are up to date ($LABEL=$hash, $serve_hash)"
  exit 0
fi

work=$(mktemp -d /tmp/kiln-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

if ! docker image inspect "$base" >/dev/null 2>&1; then
  echo "building $base (Python $pyver from $prefix + docker/train-requirements.txt) ..."
  R=$work/rootfs
  P=${prefix#/}
  mkdir -p "$R"/{etc,tmp,proc,sys,dev,root,usr/bin,usr/lib,usr/lib64,opt/kiln}
  for d in bin lib lib64 sbin; do ln -s "usr/$d" "$R/$d"; done
  tar -C / -c --exclude="$P/lib/python$pyver/site-packages" --exclude="$P/lib/python$pyver/test" \
      --exclude="$P/lib/python$pyver/idlelib" --exclude="$P/lib/python$pyver/tkinter" --exclude="$P/lib/*.a" \
      --exclude="$P/lib/python$pyver/config-*" --exclude="$P/include" --exclude="$P/share" "$P" | tar -C "$R" -x
  mkdir -p "$R/$P/lib/python$pyver/site-packages"
  # --python: pip runs under the image's interpreter, so the scripts it writes point at that interpreter.
  # The .pyc files are compiled here: without them every container start compiles torch (seconds).
  # (The grep drops pip's notes about configured index folders that lack a package.)
  "$PYTHON" -m pip --python "$prefix/bin/python$pyver" install -q --root "$R" --ignore-installed \
      --no-warn-script-location --no-warn-conflicts --root-user-action=ignore \
      -c requirements.lock -r docker/train-requirements.txt \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  # Shared libraries the interpreter, its extension modules and the wheels link against, from this machine.
  find "$R" -type f \( -name '*.so' -o -name '*.so.*' -o -path "*/bin/python$pyver" \) -print0 \
    | xargs -0 -n 64 ldd 2>/dev/null \
    | awk '/=> \//{print $3} /^\t\/[^ ]+ \(0x/{print $1}' | grep -v -e "^$R/" -e "^$prefix/" | sort -u \
    | while read -r lib; do mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$(dirname "$lib")/"; done
  cp -L "$(command -v dash || command -v sh)" "$R/usr/bin/sh"
  # kiln (uid 1000, group root) is the image's default user; /tmp is its home (the launcher mounts a tmpfs there
  # and keeps the root filesystem read-only).
  printf 'root:x:0:0:root:/root:/bin/sh\nkiln:x:1000:0:kiln:/tmp:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/sh\n' \
    > "$R/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
  chmod 755 "$R/root"
  chmod 1777 "$R/tmp"
  tar -C "$R" -c --owner=0 --group=0 --numeric-owner . \
    | docker import -c "ENV PATH=$prefix/bin:/usr/bin:/bin" -m "kiln training dependencies" - "$base" >/dev/null
  rm -rf "$R"
  echo "imported $base in $((SECONDS - start)) s"
fi

# build_code_image IMAGE HASH DOCKERFILE: the code layer on the base, unless IMAGE already has HASH.
build_code_image() {
  if [ "$(current "$1")" = "$2" ]; then
    echo "$1 is up to date ($LABEL=$2)"
    return
  fi
  local ctx
  ctx=$work/context-$(basename "$3" .Dockerfile)
  mkdir -p "$ctx"
  cp "$3" "$ctx/Dockerfile"
  tar -c --exclude=__pycache__ --exclude='*.pyc' tasks | tar -C "$ctx" -x
  # (The legacy builder: no buildx here. The grep drops its deprecation notice.)
  docker build -q --build-arg BASE="$base" --label "$LABEL=$2" --label "kiln.base=$base" -t "$1" "$ctx" \
    >/dev/null 2> >(grep -v -e "^DEPRECATED: The legacy builder" -e "buildx" -e "^ *$" >&2)
  echo "built $1 ($LABEL=$2, $(docker image inspect -f '{{.Size}}' "$1" | numfmt --to=iec)) in $((SECONDS - start)) s"
}
build_code_image "$IMAGE" "$hash" docker/train-cpu.Dockerfile
build_code_image "$SERVE_IMAGE" "$serve_hash" docker/serve-cpu.Dockerfile
# Earlier builds: dangling top layers and bases of other input hashes (a base is about 1.3 GB).
docker image prune -f --filter "label=$LABEL" >/dev/null
docker image ls kiln-train-base --format '{{.Repository}}:{{.Tag}}' | grep -vx "$base" \
  | xargs -r docker rmi >/dev/null 2>&1 || true
