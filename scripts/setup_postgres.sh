#!/usr/bin/env bash
# The tuning test against a real database (tests/test_tune.py) starts its own PostgreSQL server from Debian's
# `postgresql` package (initdb + pg_ctl, as the postgres user when run as root). Installs it when missing;
# needs root and apt. Without them it says so: the test then skips, except under CI=true, where it fails.
set -euo pipefail
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup_postgres.sh: the tuning test needs Debian's postgresql (apt-get install postgresql, as root)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q postgresql >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
echo "setup_postgres.sh: installed $(ls /usr/lib/postgresql/)"
