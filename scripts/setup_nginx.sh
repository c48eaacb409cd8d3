#!/usr/bin/env bash
# The remote-shard tests (tests/test_remote_shards.py) serve a shard set with Debian's nginx, started by the
# tests on a free port with their own config. Installs it when missing; needs root and apt. Without them it
# says so: those tests then skip, except under CI=true, where they fail.
set -euo pipefail
command -v nginx >/dev/null && exit 0
[ -x /usr/sbin/nginx ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup_nginx.sh: the remote-shard tests need Debian's nginx (apt-get install nginx, as root)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q nginx >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q nginx >/dev/null; }
# the package starts a server on port 80: the tests start their own, so stop it
(command -v service >/dev/null && service nginx stop >/dev/null 2>&1) || pkill -x nginx || true
echo "setup_nginx.sh: installed $(/usr/sbin/nginx -v 2>&1)"
