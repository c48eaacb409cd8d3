import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_DATA = ROOT.parent / "shared" / "data" / "fashion-product-images"
# Under pytest-xdist (`make test`: 2 workers on 2 cores) each worker and the runs it starts get one thread each,
# so that two workers never oversubscribe the cores (two 2-thread torch jobs on 2 cores run ~4x slower, not 2x).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 2) // _WORKERS))
torch.set_num_threads(THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# Runs here train as if launched with `--mixed_precision no`: train.mixed_precision=auto would pick bf16 on a CPU
# with bf16 matrix units and fp32 elsewhere, and the numerical comparisons (one process against two, resume
# against uninterrupted) are written for fp32 on every machine. tests/test_runtime.py checks auto itself.
os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "no")
# before any test starts cuBLAS: runs with train.deterministic (every training run here, on a GPU) need it
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Pinned dependencies that a machine may lack: the lent GPU machine has no DALI (its 424 MB wheel cannot
# travel), DeepSpeed or faiss. Here and in CI a test that needs one runs, and fails loudly if it does not
# import; a machine without them opts out by naming them (MCLFIR_TESTS_WITHOUT=dali,deepspeed,faiss).
_PACKAGES = {"dali": "nvidia.dali", "deepspeed": "deepspeed", "faiss": "faiss", "mkdocs": "mkdocs"}


def needs(name: str):
    """Skip marker for a test that needs `name` (a key of _PACKAGES): skips only where it does not import
    and MCLFIR_TESTS_WITHOUT names it."""
    opted_out = name in os.environ.get("MCLFIR_TESTS_WITHOUT", "").replace(" ", "").split(",")
    missing = None
    if opted_out:   # import only then: importing DeepSpeed costs seconds at collection
        try:
            importlib.import_module(_PACKAGES[name])
        except Exception as e:   # ImportError, or a broken install
            missing = f"{type(e).__name__}: {e}"
    return pytest.mark.skipif(missing is not None, reason=f"MCLFIR_TESTS_WITHOUT names {name}: {missing}")


def _determinism_flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


_INITIAL_DETERMINISM = _determinism_flags()


@pytest.fixture(autouse=True)
def _restore_determinism():
    """train.deterministic switches process-wide flags; after each test they go back to the process's own, so
    that no later test inherits them (a module-scoped run switches them before this fixture starts)."""
    yield
    deterministic, warn_only, cudnn_deterministic, cudnn_benchmark = _INITIAL_DETERMINISM
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark


def tiny_build_config(num_images=400, image_size=32, seed=0):
    from mclfir_dist.config import ShardBuildConfig
    cfg = ShardBuildConfig(min_value_count=5, samples_per_shard=100, seed=seed)
    cfg.synthetic.num_images, cfg.synthetic.image_size, cfg.synthetic.seed = num_images, image_size, seed
    return cfg


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A small synthetic shard set shared by the tests that only read it."""
    from mclfir_dist.data.shards import build_from_config
    out = tmp_path_factory.mktemp("shards") / "tiny"
    build_from_config(tiny_build_config(), out)
    return out


@pytest.fixture(scope="session")
def run(tiny_shards, tmp_path_factory):
    """A trained tiny run (2 increments x 8 steps) that the retrieval tests embed, index, search and export."""
    from mclfir_dist.configure import load_config
    from mclfir_dist.training.engine import train
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(tiny_shards, steps=8) + ["eval.grid_queries=0", "eval.frozen_baseline=false"])
    train(cfg, out)
    return out


@pytest.fixture(scope="session")
def catalogue(run, tiny_shards, tmp_path_factory):
    """(index folder, an image file, a catalogue key) for the tiny run: its test split embedded and indexed
    (shared by the API, service and page tests)."""
    import tarfile
    from mclfir_dist.cli import main
    work = tmp_path_factory.mktemp("catalogue")
    assert main(["embed", "--run", str(run), "--shards", str(tiny_shards), "--splits", "test",
                 "--out", str(work / "emb"), "--workers", "0"]) == 0
    assert main(["index", "--embeddings", str(work / "emb"), "--out", str(work / "index")]) == 0
    tar = sorted(Path(tiny_shards).glob("test-*.tar"))[0]
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
        (work / "query.jpg").write_bytes(t.extractfile(member).read())
    key = (work / "index" / "keys.txt").read_text().splitlines()[3]
    return work / "index", work / "query.jpg", key


def tiny_train_overrides(shards, steps=30, increments="[{name: a, attributes: [colour]},{name: b, attributes: [garment_length]}]"):
    # on a GPU the exactness tests need deterministic kernels; on CPU they are deterministic already
    deterministic = ["train.deterministic=true"] if torch.cuda.is_available() else []
    return deterministic + [f"data.shards={shards}", "data.image_size=32", "data.batch_doublets=16", "data.num_workers=0",
            "data.eval_batch_size=64", "model.head_channels=64", "model.embed_dim=32",
            f"train.steps_per_increment={steps}", "train.log_every=10", f"train.increments={increments}",
            "optim.lr=1e-3", "optim.encoder_lr_scale=0.3", "teacher.decay=0.99", "eval.grid_queries=2"]


# A run that builds its own tiny shard set: for tests that start `mclfir train` processes and kill, signal or
# resume them (each process pays its start-up, so the run itself is kept to seconds)
SELF_BUILDING_TINY = ["data.build.synthetic.num_images=240", "data.build.synthetic.image_size=32",
                      "data.build.samples_per_shard=60", "data.build.min_value_count=4", "data.image_size=32",
                      "data.batch_doublets=8", "data.num_workers=0", "data.eval_batch_size=64",
                      "model.head_channels=32", "model.embed_dim=16", "eval.grid_queries=0",
                      "eval.frozen_baseline=false",
                      "train.increments=[{name: a, attributes: [colour]},{name: b, attributes: [garment_length]}]"]


def free_port() -> str:
    """A free TCP port on this machine: parallel launches must not meet on 29500."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


_CHECKPOINT_MODEL = {}


def checkpoint_state(increment: int, **extra) -> dict:
    """A small but complete increment checkpoint state (what the loader checks: fields, head names, every
    tensor of the model its config builds), for tests of the checkpoint files themselves."""
    from mclfir_dist.config import to_dict
    from mclfir_dist.configure import load_config
    from mclfir_dist.model.mclfir import build_model
    if not _CHECKPOINT_MODEL:
        cfg = load_config(ROOT / "configs/debug_cpu.yaml", ["data.image_size=32", "model.head_channels=8",
                                                            "model.embed_dim=8"])
        model = build_model(cfg.model, cfg.data.image_size)
        model.add_head("colour")
        _CHECKPOINT_MODEL.update(config=to_dict(cfg), model=model.state_dict())
    return {"increment": increment, "global_step": 10 * increment, "heads": ["colour"], "frozen": [],
            "model": {k: v.clone() for k, v in _CHECKPOINT_MODEL["model"].items()}, "method": {},
            "config": _CHECKPOINT_MODEL["config"], "results": {"complete": False}, "rng": {}, **extra}


# The longest files first, so that two xdist workers (`--dist loadfile`: a file's tests stay together) finish
# near the same time instead of one waiting on a long file handed out last. Serial runs keep this order too.
_LONG_FILES = ["test_distributed.py", "test_extend.py", "test_e2e.py", "test_plugins.py", "test_signals.py",
               "test_dali.py", "test_chaos.py", "test_extension_points.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_LONG_FILES)))   # stable: the rest keep their order
