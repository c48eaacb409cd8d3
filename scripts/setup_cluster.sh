#!/usr/bin/env bash
# What the cluster tests (pytest -m cluster) need beyond .venv: Debian's slurm-wlm (slurmctld, slurmd, and
# munge for its authentication) and util-linux's unshare. Installs them when missing; needs root and apt.
set -euo pipefail
missing=()
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
command -v unshare >/dev/null || missing+=(util-linux)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup_cluster.sh: the cluster tests need ${missing[*]} (Debian packages); install them as root" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
echo "setup_cluster.sh: installed ${missing[*]}"
