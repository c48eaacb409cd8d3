#!/usr/bin/env bash
# Local against HTTP (Debian's nginx) against S3 (moto's server: no S3-compatible server installs on these
# machines from Debian) for one shard set, in one run of bench.loader --remote. Both servers run on loopback,
# so the network is this machine's: the figures show the software path, not a real link.
#   bash scripts/remote_bench.sh [SHARDS_DIR] [OUT_MD]     (default shards/fpi96, docs/results/remote/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${1:-shards/fpi96}; OUT=${2:-docs/results/remote/README.md}
work=$(mktemp -d); trap 'kill $(cat "$work/nginx.pid" 2>/dev/null) $moto 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
hp=$(port); sp=$(port)
mkdir -p "$work/www" && ln -s "$(realpath "$SHARDS")" "$work/www/set"
cat > "$work/nginx.conf" <<CONF
$( [ "$(id -u)" = 0 ] && echo "user root;" )
worker_processes 1; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 64; }
http { access_log off; client_body_temp_path $work/cb; proxy_temp_path $work/px; fastcgi_temp_path $work/fc;
  uwsgi_temp_path $work/uw; scgi_temp_path $work/sc;
  server { listen 127.0.0.1:$hp; location / { root $work/www; } } }
CONF
nginx -c "$work/nginx.conf" -p "$work"
.venv/bin/moto_server -H 127.0.0.1 -p "$sp" >/dev/null 2>&1 & moto=$!
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1 FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:$sp
sleep 2
.venv/bin/python -c "
import fsspec, pathlib, sys
fs = fsspec.filesystem('s3'); fs.mkdir('bench')
for p in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    if p.is_file(): fs.put_file(str(p), f'bench/set/{p.name}')" "$SHARDS"
mkdir -p "$(dirname "$OUT")"
{ echo "# Shards read locally, over HTTP and from S3"; echo
  echo "\`bash scripts/remote_bench.sh $SHARDS\` on $(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores;"
  echo "HTTP: Debian's nginx $(nginx -v 2>&1 | cut -d/ -f2); S3: moto's server mode (no S3-compatible server installs here). Both on loopback."
  echo
  .venv/bin/python -m mclfir_dist.bench.loader --shards "$SHARDS" --size 96 --workers 2 --batches 20 \
    --remote "http://127.0.0.1:$hp/set/" "s3://bench/set/" 2>&1 | grep -v "WARNING\|INFO"
  } > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"; cat "$OUT"
