#!/usr/bin/env bash
# A new attribute arrives (README "When a new attribute arrives"), on the embedded default:
#   1. train 2 attributes  2. embed and index the catalogue  3. a third attribute arrives on its own shards
#   4. extend the run  5. the compatibility report  6. update the index in place (the new head added, old
#   heads re-embedded where the report's verdict says so)  7. search all three.
# About 5 minutes on 2 cores; TINY=1 for a 1-minute toy. Output under OUT (default runs/lifecycle).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/lifecycle}
rm -rf "$OUT"; mkdir -p "$OUT"
if [ "${TINY:-0}" = 1 ]; then
  SIZE=(data.build.synthetic.num_images=240 data.build.synthetic.image_size=32 data.build.samples_per_shard=60
        data.build.min_value_count=4 data.image_size=32 data.batch_doublets=8 model.head_channels=32 model.embed_dim=16)
  STEPS=5; NEW_IMAGES=240
else
  SIZE=(); STEPS=${STEPS:-60}; NEW_IMAGES=1500
fi
COMMON=(data.shards=$OUT/shards data.num_workers=0 eval.grid_queries=0
        eval.frozen_baseline=false train.steps_per_increment=$STEPS "${SIZE[@]}")
TWO="train.increments=[{name: colour, attributes: [colour]},{name: sleeves, attributes: [sleeve_length]}]"
THREE="train.increments=[{name: colour, attributes: [colour]},{name: sleeves, attributes: [sleeve_length]},{name: pattern, attributes: [pattern], shards: $OUT/new_shards}]"
step() { echo; echo "== $*"; }
t0=$SECONDS
step "1. train colour and sleeve_length"
$PY -m mclfir_dist.cli train --config configs/debug_cpu.yaml --out $OUT/run "${COMMON[@]}" "$TWO" 2>&1 | grep -E "increment|mAP" | tail -4
step "2. embed and index the catalogue (test split) with the deployed model"
$PY -m mclfir_dist.cli embed --run $OUT/run --shards $OUT/shards --splits test --out $OUT/emb_v1 --workers 0 2>&1 | tail -1
$PY -m mclfir_dist.cli index --embeddings $OUT/emb_v1 --out $OUT/index_v1
step "3. pattern arrives, with its own labelled photos"
$PY -m mclfir_dist.cli shards build --out $OUT/new_shards --num-images $NEW_IMAGES --seed 7 \
    --image-size "$( [ "${TINY:-0}" = 1 ] && echo 32 || echo 64 )" 2>&1 | tail -1
step "4. extend the run by one increment"
t_ext=$SECONDS
$PY -m mclfir_dist.cli train --config configs/debug_cpu.yaml --resume $OUT/run "${COMMON[@]}" "$THREE" 2>&1 | grep -E "extending|compatibility" || true
echo "extension: $((SECONDS - t_ext)) s"
step "5. compatibility: can the deployed index stay?"
$PY -m mclfir_dist.cli report $OUT/run --out $OUT/report | sed -n '/deployed index after/,/^## cost/p' | head -12
step "6. update the deployed index in place: the new head added; old heads re-embedded only where the report says so"
Q=$OUT/query.jpg
KEY=$(head -1 $OUT/index_v1/keys.txt)
$PY - "$OUT" "$KEY" <<'PYEOF'
import sys
from mclfir_dist.retrieval.index import CatalogueIndex
from mclfir_dist.retrieval.search import _image_bytes
cat = CatalogueIndex(f"{sys.argv[1]}/index_v1")
open(f"{sys.argv[1]}/query.jpg", "wb").write(_image_bytes(cat, [cat.row(sys.argv[2])])[cat.row(sys.argv[2])])
PYEOF
echo "the deployed index, searched with the extended model (refused: other weights):"
$PY -m mclfir_dist.cli search --run $OUT/run --index $OUT/index_v1 --attribute colour --image $Q --k 3 2>&1 | tail -1 || true
cp -r $OUT/index_v1 $OUT/index_v2
REEMBED=$($PY - "$OUT/run/results.json" <<'PYEOF'
import json, sys
from mclfir_dist.evaluation.record import verdict
last = json.load(open(sys.argv[1]))["compatibility"][-1]["attributes"]
print(",".join(a for a, row in last.items() if verdict({a: row}).startswith("re-embed")))
PYEOF
)
echo "verdicts say re-embed: ${REEMBED:-none}"
$PY -m mclfir_dist.cli embed --run $OUT/run --shards $OUT/shards --splits test --out $OUT/emb_v2 --workers 0 \
    --attributes "pattern${REEMBED:+,$REEMBED}" 2>&1 | tail -1
$PY -m mclfir_dist.cli index update --index $OUT/index_v2 --embeddings $OUT/emb_v2
step "7. search all three attributes"
for a in colour sleeve_length pattern; do
  # an attribute kept on its deployed vectors is searched across models on purpose: the note says what it costs
  case ",pattern,$REEMBED," in *",$a,"*) OTHER=() ;; *) OTHER=(--allow-other-model) ;; esac
  $PY -m mclfir_dist.cli search --run $OUT/run --index $OUT/index_v2 --attribute $a --image $Q --k 3 "${OTHER[@]}"
done
echo; echo "lifecycle done in $((SECONDS - t0)) s; everything under $OUT"
