"""The `mclfir` command: shards | train | eval | report.

Errors users can fix (bad config keys, bad input rows, missing shards) print one clear line
and exit with status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .config import ShardBuildConfig, describe, peek_plugins
from .errors import USER_ERRORS, ConfigError, WorkerDiedError
from .plugins import import_plugins, require_saved, trust_saved_plugins
from .runfolder.layout import RunFolder

# ---------------------------------------------------------------- shards

class FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except an empty one ('(default: )' said nothing)."""

    def _get_help_string(self, action):
        if action.default in ("", None, False, []) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_shards(sub, converters: bool = True):
    d = ShardBuildConfig()   # the defaults are the config's, stated once
    p = sub.add_parser("shards", help="build or inspect WebDataset shard sets")
    ssub = p.add_subparsers(dest="shards_cmd", required=True)
    b = ssub.add_parser("build", help="build shards (+ DALI index files + manifest.json)", formatter_class=FORMATTER,
                        description="Build a shard set from the embedded synthetic generator or from a CSV of "
                                    "image paths and attribute columns.")
    b.add_argument("--out", required=True, help="output shard directory (SHARDS_DIR)")
    b.add_argument("--source", choices=["synthetic", "csv"], default="synthetic",
                   help="the embedded garment generator, or a CSV of image paths and attribute columns")
    b.add_argument("--csv", help="CSV with one row per image (source=csv)")
    b.add_argument("--image-root", help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    b.add_argument("--image-column", default=d.csv.image_column, help="CSV column holding the image path")
    b.add_argument("--key-column", default="", help="column used as the sample key (default: from the image path)")
    b.add_argument("--attributes", default="", help="comma-separated attribute columns (source=csv)")
    b.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows with a missing/undecodable image or an empty value (counted and listed in the "
                        "manifest) instead of failing")
    b.add_argument("--num-images", type=int, default=d.synthetic.num_images, help="synthetic: images to render")
    b.add_argument("--image-size", type=int, default=d.synthetic.image_size, help="synthetic: image side in pixels")
    b.add_argument("--resize-to", type=int, default=d.resize_to,
                   help="csv: re-encode images to this shorter side (0 = keep bytes)")
    b.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="csv: an image with more pixels (width x height) is a bad row (0 = no limit)")
    b.add_argument("--min-value-count", type=int, default=d.min_value_count, help="drop attribute values with fewer images")
    b.add_argument("--val-fraction", type=float, default=d.val_fraction, help="fraction of images in the validation split")
    b.add_argument("--test-fraction", type=float, default=d.test_fraction, help="fraction of images in the test split")
    b.add_argument("--query-fraction", type=float, default=d.query_fraction,
                   help="within val/test, per attribute and value, the fraction used as queries")
    b.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard, help="samples per tar shard")
    b.add_argument("--seed", type=int, default=d.seed, help="seed of the generator and of the split assignment")
    i = ssub.add_parser("info", help="print a shard set's manifest summary")
    i.add_argument("shards", help="shard directory (holds manifest.json)")
    if not converters:   # listing them imports the shard writer (torch, webdataset): 1 s of `mclfir --help`
        ssub.add_parser("convert", help="a published dataset split -> shards (`mclfir shards convert -h` lists them)")
        return
    from .data.converters import CONVERTERS
    c = ssub.add_parser("convert", help="a published dataset split -> shards (" + ", ".join(CONVERTERS.names()) + ")",
                        formatter_class=FORMATTER,
                        description="Convert a dataset in its published split format into shards. NAME: "
                                    + "; ".join(f"{n}: {CONVERTERS.get(n).about}" for n in CONVERTERS.names()))
    c.add_argument("name", metavar="NAME", choices=CONVERTERS.names(),
                   help="converter: " + ", ".join(CONVERTERS.names()))
    c.add_argument("--root", required=True, help="folder with the dataset's split files")
    c.add_argument("--image-root", help="folder the image paths are relative to (default: --root)")
    c.add_argument("--out", required=True, help="output shard directory")
    c.add_argument("--resize-to", type=int, default=0, help="re-encode images to this shorter side (0 = keep bytes)")
    c.add_argument("--attribute-prefix", default="",
                   help="prefix of every attribute name, e.g. darn_ (unique names across datasets)")
    c.add_argument("--min-value-count", type=int, default=None,
                   help="drop values with fewer images (default: the converter's own)")
    c.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")


def cmd_shards(args) -> int:
    from .data.manifest import Manifest
    from .data.shards import build_from_config
    if args.shards_cmd == "info":
        m = Manifest.load(args.shards)
        _print_manifest(m)
        return 0
    if args.shards_cmd == "convert":
        from .data.converters import CONVERTERS
        converter = CONVERTERS.get(args.name)
        min_count = args.min_value_count if args.min_value_count is not None else converter.default_min_value_count
        cfg = ShardBuildConfig(resize_to=args.resize_to, samples_per_shard=args.samples_per_shard,
                               min_value_count=min_count)
        with _built_at(args.out) as local:
            _print_manifest(converter.convert(args.root, str(local), args.image_root, cfg, args.attribute_prefix))
        return 0
    cfg = ShardBuildConfig(source=args.source, min_value_count=args.min_value_count, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, query_fraction=args.query_fraction,
                           samples_per_shard=args.samples_per_shard, resize_to=args.resize_to, seed=args.seed,
                           max_image_pixels=args.max_image_pixels)
    cfg.synthetic.num_images, cfg.synthetic.image_size, cfg.synthetic.seed = args.num_images, args.image_size, args.seed
    if args.source == "csv":
        if not args.csv:
            raise ConfigError("--source csv needs --csv PATH")
        cfg.csv.csv = args.csv
        cfg.csv.image_root = args.image_root or str(Path(args.csv).parent)
        cfg.csv.image_column, cfg.csv.key_column = args.image_column, args.key_column
        cfg.csv.attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
        cfg.csv.skip_bad_rows = args.skip_bad_rows
    with _built_at(args.out) as local:
        _print_manifest(build_from_config(cfg, local))
    return 0


def _built_at(out: str):
    """A local folder to build in: `out` itself, or for a URL a temporary one uploaded there when the build
    succeeded (manifest last: a half-uploaded set is never read as complete)."""
    import contextlib
    import tempfile
    from .data import remote

    @contextlib.contextmanager
    def build():
        if not remote.is_url(out):
            yield Path(out)
            return
        remote.check_url(out)
        with tempfile.TemporaryDirectory(prefix="mclfir-shards-") as tmp:
            yield Path(tmp) / "set"
            sent = remote.upload(Path(tmp) / "set", out)
            print(f"uploaded {len(sent)} files ({sum(sent.values()):,} bytes) to {remote.redact(out)}, "
                  "manifest.json last")
    return build()


def _print_manifest(m) -> None:
    d = m.data
    print(f"shards: {m.root}  ({d['source'].get('type')})")
    for sp, info in d["splits"].items():
        print(f"  {sp:5s} {info['count']:6d} images in {len(info['shards'])} shards")
    for a in d["attributes"]:
        q = len(d["eval_sets"]["test"][a["name"]]["query"])
        c = len(d["eval_sets"]["test"][a["name"]]["candidate"])
        print(f"  {a['name']}: {len(a['values'])} values, test {q} queries / {c} candidates"
              + (f", dropped {len(a['dropped_values'])} rare values" if a["dropped_values"] else ""))
    if d.get("skipped_rows"):
        print(f"  skipped {len(d['skipped_rows'])} bad rows (listed in manifest.json)")


# ---------------------------------------------------------------- train

def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (e.g. configs/debug_cpu.yaml); default with --resume: "
                                    "RUN_DIR/config.yaml")
    p.add_argument("--out", help="run directory (RUN_DIR): results.json, checkpoints/, tensorboard/")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue a stopped run (inside its last increment if a partial checkpoint exists); "
                        "'auto' (with --out): resume if RUN_DIR holds a checkpoint, else start fresh "
                        "(elastic restarts)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a RUN_DIR that already holds a run, deleting its checkpoints and results")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--trust-run-plugins", action="store_true",
                   help="--resume without --config: import the plug-ins the run's config.yaml lists (runs their "
                        "code; otherwise name them with --plugins or in the config you pass)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps_per_increment=50")


def resolve_run_dir(args) -> tuple:
    """(run directory, resume?, replace?) from --out / --resume / --overwrite; refuses to mix two runs in one
    folder. Nothing is deleted here: `replace_run` does that once the config is known to be valid."""
    if args.resume and args.overwrite:
        raise ConfigError(f"--resume {args.resume} and --overwrite contradict each other")
    if args.resume and args.resume != "auto":
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError(f"--resume {args.resume} and --out {args.out} name different run directories")
        return Path(args.resume), True, False
    if not args.out:
        raise ConfigError("give --out RUN_DIR (or --resume RUN_DIR)")
    run_dir = Path(args.out)
    if args.resume == "auto":
        from .training.checkpoint import Checkpointer  # torch: imported only when it is needed
        has_state = bool(Checkpointer(run_dir).increments()) or Checkpointer(run_dir).partial_path.is_file()
        return run_dir, has_state, False
    if RunFolder(run_dir).is_run() and not args.overwrite:
        raise ConfigError(f"{run_dir} already holds a run (checkpoints or results.json): pass --resume {run_dir} "
                          f"to continue it, --overwrite to replace it, or another --out")
    return run_dir, False, RunFolder(run_dir).is_run()


def replace_run(run_dir: Path) -> None:
    """--overwrite: the old run's files go (only those a run writes; anything else in the folder stays)."""
    if int(os.environ.get("RANK", "0")) != 0:   # under a launcher every rank parses the same flags
        return
    for target in RunFolder(run_dir).existing():
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def cmd_train(args) -> int:
    from .configure import load_config  # the registries' modules: torch and the rest, for training only
    if args.help_config:
        import_plugins(peek_plugins(args.config, args.overrides))
        print("\n".join(describe()))
        return 0
    run_dir, resume, replace = resolve_run_dir(args)
    if getattr(args, "trust_run_plugins", False):
        trust_saved_plugins()
    config = args.config
    if resume and not config:   # the run's own file: its plug-ins are the run's, not the user's
        config = str(RunFolder(run_dir).config)
        require_saved(peek_plugins(config, []), config)
    if not config:
        raise ConfigError("give --config FILE")
    cfg = load_config(config, args.overrides)
    from .training.engine import train
    from .training.lock import RunLock
    from .training.signals import RunStopped
    main_process = int(os.environ.get("RANK", "0")) == 0   # under a launcher every rank runs this
    lock = RunLock(run_dir).acquire() if main_process else None   # one writer per run directory
    try:
        if replace:
            replace_run(run_dir)
        train(cfg, run_dir, resume=resume)
    except RunStopped as stopped:
        if main_process:
            print(f"mclfir train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except WorkerDiedError as e:   # not the user's input (exit 1), but one line, not torch's traceback
        print(f"mclfir train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 0


# ---------------------------------------------------------------- eval

def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a run's last checkpoint on any shard set", formatter_class=FORMATTER,
                       description="Per-attribute mAP of the run's last checkpoint on SHARDS_DIR's "
                                   "query/candidate sets; prints it and writes it as JSON. With --export, also writes query_emb.npy, "
                                   "query_labels.npy, cand_emb.npy, cand_labels.npy under OUT_DIR/<attribute>/.")
    p.add_argument("--run", required=True, help="run directory (RUN_DIR)")
    p.add_argument("--shards", required=True, help="shard directory (SHARDS_DIR)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="which split's query/candidate sets")
    p.add_argument("--export", metavar="OUT_DIR", help="write embeddings and labels as .npy per attribute")
    p.add_argument("--json", help="where to write the mAP JSON (default RUN_DIR/eval_<shards>_<split>.json)")
    p.add_argument("--skip-bad-shards", action="store_true",
                   help="leave out shards whose size or sample count differs from the manifest (listed in the JSON)")


def cmd_eval(args) -> int:
    from .training.offline import evaluate_run
    evaluate_run(args.run, args.shards, args.split, args.export, args.json, args.skip_bad_shards)
    return 0


# ---------------------------------------------------------------- report

def _add_report(sub):
    p = sub.add_parser("report", help="tables and plots from one or more runs' results.json", formatter_class=FORMATTER)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="write report.md and PNG plots here (default: the first run directory)")


def cmd_report(args) -> int:
    from .evaluation.report import report
    report(args.runs, args.out)
    return 0


# ---------------------------------------------------------------- use a trained model

def _add_search(sub, formatter):
    q = sub.add_parser("search", formatter_class=formatter, help="top-k of a catalogue for a query, by attribute",
                       description="Prints rank, key, score and (where the catalogue has labels) value.")
    q.add_argument("--run", help="run directory (needed with --image: its model embeds the query)")
    q.add_argument("--index", required=True, help="an `mclfir index` output folder (INDEX)")
    qa = q.add_mutually_exclusive_group(required=True)
    qa.add_argument("--attribute", help="whose head ranks the catalogue")
    qa.add_argument("--attributes", help="a combined query: rank by the weighted sum of per-attribute similarities, "
                                         "e.g. colour:1,pattern:0.5")
    qs = q.add_mutually_exclusive_group(required=True)
    qs.add_argument("--image", help="query image file")
    qs.add_argument("--key", help="a catalogue key as the query (it is left out of its own results)")
    qs.add_argument("--queries", help="many queries: a folder of images, or a CSV with a 'query' column (catalogue "
                                      "keys or image paths); needs --out")
    q.add_argument("--out", help="with --queries: hits.jsonl (a line per query) or hits.csv (a row per hit)")
    q.add_argument("--where", help="keep items whose catalogue labels match, e.g. colour=red,pattern=striped "
                                   "(post-filtering with over-fetch: max(4k, 64), doubled until k pass)")
    q.add_argument("--k", type=int, default=10, help="results to show")
    q.add_argument("--sheet", help="also draw the query and its top-k into this PNG")
    q.add_argument("--allow-other-model", action="store_true",
                   help="search an index embedded by other weights (e.g. before an extension); prints the run's "
                        "measured compatibility")
    q.add_argument("--skip-bad-queries", action="store_true",
                   help="with --queries: search the others when a key is unknown or an image unusable, and list "
                        "the skipped ones (stderr, and hits.jsonl); without it the batch stops before searching")


def _add_use(sub, formatter):
    e = sub.add_parser("embed", formatter_class=formatter, help="embed a catalogue of images with a run's model",
                       description="One embedding matrix per attribute, keys beside it, a JSON of what produced "
                                   "it; unreadable images are counted and listed, never fatal. GPU when there is one.")
    e.add_argument("--run", required=True, help="run directory (its newest good checkpoint is used)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively; key = path without suffix)")
    src.add_argument("--csv", help="CSV with an image path column (attribute columns become labels)")
    src.add_argument("--shards", help="a shard set (its labels come along)")
    e.add_argument("--out", required=True, help="output folder (EMB)")
    e.add_argument("--attributes", default="", help="comma-separated heads to use (default: all of the run's)")
    e.add_argument("--batch", type=int, default=64, help="images per forward pass")
    e.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    e.add_argument("--splits", default="train,val,test", help="with --shards: which splits")
    e.add_argument("--image-column", default="filename", help="with --csv: the image path column")
    e.add_argument("--key-column", default="", help="with --csv: the key column (default: from the image path)")
    e.add_argument("--image-root", help="with --csv: folder the paths are relative to (default: the CSV's folder)")
    e.add_argument("--label-map", default="", metavar="COLUMN=HEAD,...",
                   help="with --csv: the column that labels a head whose name differs (e.g. baseColour=colour)")
    e.add_argument("--label-columns", default="", metavar="COLUMN,...",
                   help="with --csv: more columns to keep as labels, to filter on and show (shards keep all theirs)")
    e.add_argument("--dry-run", action="store_true",
                   help="embed a few batches only, print the images/s measured and what the whole catalogue would "
                        "cost; write nothing")

    i = sub.add_parser("index", formatter_class=formatter, help="build FAISS indexes over `mclfir embed` output",
                       description="One index per attribute: exact inner product by default; IVF or HNSW for "
                                   "catalogues above ~1M images.")
    i.add_argument("action", nargs="?", choices=["update"],
                   help="update: add or replace items by key from --embeddings, and/or --remove keys, in --index")
    i.add_argument("--embeddings", help="an `mclfir embed` output folder (EMB)")
    i.add_argument("--out", help="output folder (INDEX) of a build")
    i.add_argument("--index", help="update: the index folder to change in place")
    i.add_argument("--remove", action="append", default=[], metavar="KEYS",
                   help="update: comma-separated keys, or @FILE with one key per line, to delete")
    i.add_argument("--attributes", default="", help="only these attributes' indexes (build: the others are kept)")
    i.add_argument("--dry-run", action="store_true", help="update: print what would change, write nothing")
    i.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat", help="exact (flat) or approximate")
    i.add_argument("--nlist", type=int, default=0, help="ivf: inverted lists (0 = 4 sqrt(N))")
    i.add_argument("--nprobe", type=int, default=16, help="ivf: lists probed per query")
    i.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    i.add_argument("--ef-search", type=int, default=64, help="hnsw: search breadth")

    _add_search(sub, formatter)

    x = sub.add_parser("export", formatter_class=formatter, help="a run -> model.safetensors + config.json",
                       description="A portable model that `mclfir_dist.retrieval.portable.load_exported` rebuilds with torch "
                                   "and torchvision only; the trunk keeps torchvision's key names.")
    x.add_argument("--run", required=True, help="run directory")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--checkpoint", help="a specific increment checkpoint (default: the newest good one)")
    x.add_argument("--torch-export", action="store_true", help="also write model.pt2 (torch.export, dynamic batch)")


def cmd_embed(args) -> int:
    from .retrieval.embed import embed_catalogue
    embed_catalogue(args.run, args.out, args.images, args.csv, args.shards,
                    [a.strip() for a in args.attributes.split(",") if a.strip()], args.batch, args.workers,
                    [s.strip() for s in args.splits.split(",") if s.strip()], args.image_column, args.key_column,
                    args.image_root, dry_run=args.dry_run, label_map=_pairs(args.label_map, "--label-map"),
                    label_extra=[c.strip() for c in args.label_columns.split(",") if c.strip()])
    return 0


def _pairs(spec: str, flag: str) -> dict:
    """'a=b,c=d' -> {a: b, c: d}: one NAME each."""
    from .retrieval.batch import parse_where
    out = {}
    for left, rights in parse_where(spec, flag).items():
        if len(rights) != 1 or not rights[0]:
            raise ConfigError(f"{flag} {spec!r}: {left!r} needs exactly one NAME (NAME=NAME)")
        out[left] = rights[0]
    return out


def cmd_index(args) -> int:
    from .retrieval.index import index_catalogue, update_index
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    if args.action == "update":
        if not args.index:
            raise ConfigError("index update needs --index INDEX (the folder to change in place)")
        plan = update_index(args.index, args.embeddings, args.remove, attributes, args.dry_run)
        print(f"{'would change' if args.dry_run else 'updated'} {args.index}: {plan['added']} added, "
              f"{plan['replaced']} replaced, {plan['removed']} removed -> {plan['items']} items; attributes "
              f"updated {plan['updated'] or '-'}, new {plan['new_attributes'] or '-'}, rebuilt (other weights) "
              f"{plan['rebuilt'] or '-'}; {plan['seconds']:.2f} s")
        return 0
    if not args.embeddings or not args.out:
        raise ConfigError("index needs --embeddings EMB and --out INDEX (or: index update --index INDEX ...)")
    meta = index_catalogue(args.embeddings, args.out, args.kind, args.nlist, args.nprobe, args.hnsw_m, args.ef_search,
                           attributes)
    for a, info in meta["attributes"].items():
        if "build_seconds" in info and (not attributes or a in attributes):
            print(f"{a}: {info['vectors']} vectors, {meta['kind']} index built in {info['build_seconds']:.2f} s "
                  f"({info['vectors_per_second']:.0f} vectors/s)")
    return 0


def cmd_search(args) -> int:
    from .retrieval.batch import batch_search, parse_weights, parse_where, print_hits
    from .retrieval.search import search_catalogue
    if args.queries or args.out:
        if not (args.queries and args.out):
            raise ConfigError("--queries and --out go together (many queries -> hits.jsonl or hits.csv)")
        weights = parse_weights(args.attributes or args.attribute)
        batch_search(args.run, args.index, args.queries, args.out, weights, args.k, parse_where(args.where),
                     args.allow_other_model, args.skip_bad_queries)
    elif args.attributes or args.where:
        if args.sheet:
            raise ConfigError("--sheet draws one attribute's plain search: drop --attributes/--where")
        print_hits(args.run, args.index, args.image, args.key, parse_weights(args.attributes or args.attribute),
                   args.k, parse_where(args.where), args.allow_other_model)
    else:
        search_catalogue(args.run, args.index, args.attribute, args.image, args.key, args.k, args.sheet,
                         args.allow_other_model)
    return 0


def _add_tune(sub, formatter):
    t = sub.add_parser("tune", formatter_class=formatter, help="hyperparameter search on Optuna over training runs",
                       description="Trials are ordinary runs in OUT/trials/NNNN, on the validation split; several "
                                   "workers (processes, machines, a SLURM array) share one study through --storage "
                                   "and stop together at --trials finished ones. docs/tuning.md.")
    t.add_argument("--config", help="experiment YAML; it must evaluate on eval.split=val (needed unless --report)")
    t.add_argument("--space", help="search space YAML (default: the method's own tune_space)")
    t.add_argument("--trials", type=int, default=20, help="finished trials (complete or pruned) of the study")
    t.add_argument("--study", default="mclfir", help="study name in the storage")
    t.add_argument("--storage", help="Optuna RDB URL (default: sqlite:///OUT/study.db); a PostgreSQL URL for "
                                     "workers on many machines")
    t.add_argument("--out", default="runs/tune", help="folder of the trials' runs and the report")
    t.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe", help="grid: choices only")
    t.add_argument("--pruner", choices=["median", "none"], default="median",
                   help="stop a trial whose validation curve falls below the median of earlier trials")
    t.add_argument("--metric", default="final.average_map", help="the results.json field ranked by")
    t.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    t.add_argument("--startup-trials", type=int, default=10,
                   help="tpe: random trials before the model takes over (with few trials, fewer)")
    t.add_argument("--start-at-config", action="store_true",
                   help="trial 0 runs the config's own values of the space's keys (a known-good start)")
    t.add_argument("--resume-study", action="store_true", help="go on with a study stored with other settings")
    t.add_argument("--report", action="store_true",
                   help="run nothing: write OUT/report/REPORT.md (table, knobs interior or at an end) and plots")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every trial")


def cmd_tune(args) -> int:
    from .tune import report, space as spaces, study as studies
    out = Path(args.out)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if args.report:
        job = studies.TuneJob(args.config, args.overrides, {}, args.trials, args.study, storage, out)
        found = studies.open_study_readonly(job)
        print(report.write_report(found, found.user_attrs["settings"], out / "report", studies.redact(storage)))
        print(f"wrote {out / 'report' / 'REPORT.md'}")
        return 0
    if not args.config:
        raise ConfigError("tune needs --config C (the experiment every trial runs)")
    from .configure import load_config
    method = load_config(args.config, args.overrides).train.method
    job = studies.TuneJob(args.config, args.overrides, spaces.load_space(args.space, method), args.trials,
                          args.study, storage, out, args.sampler, args.pruner, args.metric, args.seed,
                          args.resume_study, args.startup_trials, args.start_at_config)
    studies.check_job(job)
    if storage.startswith("sqlite:///") and not args.storage:
        out.mkdir(parents=True, exist_ok=True)   # only now: a refused job writes nothing
    ran = studies.run_worker(job)
    print(f"tune: this worker ran {ran} trials; study {args.study!r} in {studies.redact(storage)}; "
          f"`mclfir tune --report --out {out} --config {args.config}` writes the table and plots")
    return 0


def _add_serve(sub, formatter):
    v = sub.add_parser("serve", formatter_class=formatter, help="an HTTP service and search page over an index",
                       description="GET / is the search page; GET /health, GET /attributes, GET /items, "
                                   "GET /items/KEY, GET /items/KEY/image, POST /search (docs/serve.md).")
    v.add_argument("--run", help="run directory: its model embeds uploaded images (without it: key queries only)")
    v.add_argument("--index", required=True, help="an `mclfir index` folder")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (other machines can reach 0.0.0.0; there "
                                                      "is no authentication)")
    v.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    v.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted upload")
    v.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted image (width x height)")
    v.add_argument("--max-k", type=int, default=100, help="most results one search may ask for")
    v.add_argument("--allow-other-model", action="store_true", help="serve an index embedded by other weights")
    v.add_argument("--access-log", nargs="?", const="-", metavar="FILE",
                   help="one line per request to FILE (appended), or to stderr without FILE: time, client, "
                        "\"method path\", status, bytes, milliseconds, route (docs/serve.md)")
    v.add_argument("--images-root", metavar="DIR",
                   help="serve only images under DIR (links resolved): a locations.txt line elsewhere is a 404")
    v.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names the service answers besides the bound address (requests "
                        "naming another Host are refused: DNS rebinding)")


def cmd_serve(args) -> int:
    from .serve.app import serve
    from .serve.inputs import Limits
    if not 0 < args.port < 65536 or args.max_k < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1:
        raise ConfigError("--port is 1-65535; --max-k, --max-upload-mb and --max-pixels must be positive")
    serve(args.run, args.index, args.host, args.port,
          Limits(int(args.max_upload_mb * 1024 * 1024), args.max_pixels, args.max_k), args.allow_other_model,
          args.access_log, args.allowed_hosts.split(","), args.images_root)
    return 0


def cmd_export(args) -> int:
    from .retrieval.export import export_run
    print(f"wrote {export_run(args.run, args.out, args.checkpoint, args.torch_export)}")
    return 0


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """Every subcommand's parser; with `command` given, only that one lists the converters (the slow part)."""
    formatter = FORMATTER
    p = argparse.ArgumentParser(prog="mclfir", description="MCL-FIR: continual attribute-specific fashion retrieval")
    p.add_argument("--version", action="version", version=f"mclfir_dist {__version__}")
    p.add_argument("--plugins", metavar="MODULE[,MODULE]",
                   help="import these modules first (they may register converters, trunks, methods...); installed "
                        "ones load from the mclfir_dist.plugins entry points. A run's saved list is never imported "
                        "by itself: name its plug-ins here, or pass --trust-run-plugins")
    p.add_argument("--trust-run-plugins", action="store_true",
                   help="import the plug-ins a run's saved config lists (runs their code: only for runs you trust)")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_shards(sub, converters=command in (None, "shards"))
    t = sub.add_parser("train", formatter_class=formatter,
                       help="train over the config's increments (also: accelerate launch -m mclfir_dist.train)",
                       description="Train MCL-FIR and write RUN_DIR/results.json, checkpoints and TensorBoard events.")
    add_train_args(t)
    _add_eval(sub)
    _add_report(sub)
    _add_use(sub, formatter)
    _add_serve(sub, formatter)
    _add_tune(sub, formatter)
    return p


def _plugin_option(argv: List[str]) -> List[str]:
    """Modules named by `--plugins a,b` (read before the parser is built: they may add converters)."""
    names: List[str] = []
    for i, arg in enumerate(argv):
        if arg == "--plugins" and i + 1 < len(argv):
            names += argv[i + 1].split(",")
        elif arg.startswith("--plugins="):
            names += arg.split("=", 1)[1].split(",")
    return [n.strip() for n in names if n.strip()]


def _command(argv: List[str]) -> str:
    """The subcommand named in argv ('' when none: `mclfir --help`), skipping the values of global options."""
    values = {"--plugins"}
    for i, arg in enumerate(argv):
        if not arg.startswith("-") and (i == 0 or argv[i - 1] not in values):
            return arg
    return ""


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if _command(argv):   # --version and --help run no plug-in: a broken installed one cannot stop them
            import_plugins(_plugin_option(argv))
        trust_saved_plugins("--trust-run-plugins" in argv)
    except USER_ERRORS as e:
        print(f"mclfir: error: {e}", file=sys.stderr)
        return 2
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)   # it logs which SIMD build it loaded
    handlers = {"shards": cmd_shards, "train": cmd_train, "eval": cmd_eval, "report": cmd_report,
                "embed": cmd_embed, "index": cmd_index, "search": cmd_search, "export": cmd_export,
                "serve": cmd_serve, "tune": cmd_tune}
    try:
        return handlers[args.cmd](args)
    except USER_ERRORS as e:
        print(f"mclfir {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
