#!/usr/bin/env bash
# Install Debian's prometheus package (the prometheus server and promtool) for the alert-rule tests, which start
# their own server on loopback with a temporary config. A no-op when both commands exist. The package's own service
# is not started: a policy-rc.d that refuses every start is in place during the install (the one Docker images
# ship is kept), and on a systemd host the unit the package enables is disabled again. --no-install-recommends
# keeps out prometheus-node-exporter, another service.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "prometheus/promtool are missing and this script can only install them as root on Debian/Ubuntu;" \
       "install the prometheus package (or put both binaries on PATH), then re-run" >&2
  exit 1
fi
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# installed by kiln docker/monitoring/install-prometheus.sh for one install\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
echo "installing prometheus (Debian package; its service is not started) ..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
prometheus --version 2>&1 | head -1
