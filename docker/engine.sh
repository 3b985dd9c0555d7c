#!/usr/bin/env bash
# Make sure a Docker engine answers: a no-op when `docker info` already succeeds; otherwise install Debian's
# docker.io (no systemd here, so dockerd is started by hand) and wait until it is ready.
# Usage: docker/engine.sh STATE_DIR   (dockerd's log and pid file go there)
set -euo pipefail
state=${1:?usage: docker/engine.sh STATE_DIR}

if docker info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "no Docker engine answers and this script can only install one as root on Debian/Ubuntu;" \
         "install Docker and start it, then re-run" >&2
    exit 1
  fi
  echo "installing docker.io (Debian package) ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io containerd runc iptables >/dev/null
fi
mkdir -p "$state"
pidfile=$state/dockerd.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "dockerd (pid $(cat "$pidfile")) is running but not answering yet; waiting"
else
  # setsid: the daemon outlives this make invocation and does not get the terminal's signals.
  setsid dockerd >"$state/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  echo "started dockerd (pid $!, log $state/dockerd.log)"
fi
for _ in $(seq 1 150); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "dockerd exited; last lines of $state/dockerd.log:" >&2
    tail -20 "$state/dockerd.log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "dockerd did not answer within 30 s; see $state/dockerd.log" >&2
exit 1
