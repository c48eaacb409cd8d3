"""What a launch across processes and nodes must agree on before any work: a launcher that started lone
processes where it was asked for a world is refused; every rank must see the same run directory and the
same shard sets (a shared filesystem, or the same shard set copied to the same path on every node). Each
check gathers every rank's view and raises the same one-line error on every rank, so none hangs in a
collective waiting for a rank that died."""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any, Dict, Iterable, List

from ..errors import ConfigError
from ..runfolder.layout import RunFolder
from ..utils.distributed import gather_objects

SHARED_FS = ("every node must see it at the same path: put it on a shared filesystem"
             " (or, for shards, copy the same shard set to that path on every node)")


def check_launcher() -> None:
    """`accelerate launch --cpu --num_machines 2` (or `--num_processes 2`) starts ONE process per launch and
    tells it nothing of the others: each would train its own world-1 run into the same --out. The simple
    launcher still exports MASTER_PORT for the world it was asked for; a real process group sets WORLD_SIZE."""
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_PORT" in os.environ
            and "WORLD_SIZE" not in os.environ):
        raise ConfigError("`accelerate launch --cpu` with --num_machines or --num_processes above 1 starts one lone "
                          "process per launch (world size 1), not one run: drop --cpu and launch with "
                          "--config_file launch/multinode_cpu.yaml (several nodes) or launch/cpu_2proc.yaml (one "
                          "node); on a machine without CUDA they use gloo")
    # a launcher that starts N copies of the command itself (srun, mpirun) without a torch launcher in between:
    # N lone world-1 runs into one --out. torchrun and accelerate set WORLD_SIZE for a real process group.
    if "WORLD_SIZE" not in os.environ:
        for var, launcher in LONE_COPIES:
            copies = os.environ.get(var, "")
            if copies.isdigit() and int(copies) > 1:
                raise ConfigError(f"{launcher} started {copies} copies of this command ({var}={copies}) but none of "
                                  "them is in a process group (no WORLD_SIZE): each would train alone into the same "
                                  "run; start one `accelerate launch` (or torchrun) per node, as "
                                  "launch/slurm_step.sh does")


LONE_COPIES = [("SLURM_STEP_NUM_TASKS", "srun"), ("OMPI_COMM_WORLD_SIZE", "mpirun"), ("PMI_SIZE", "an MPI launcher")]


def nodes_of(views: List[Dict[str, Any]]) -> int:
    return len({v["node"] for v in views})


def my_view() -> Dict[str, Any]:
    # GROUP_RANK: torchrun's node (agent) index; two "nodes" on one host share a hostname, not a group rank
    return {"host": socket.gethostname(), "node": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)))}


def _lock_token(run_dir: Path) -> str:
    try:
        return RunFolder(run_dir).lock.read_text(errors="replace").strip() or "an empty lock file"
    except OSError:
        return "no lock file"


def _manifest_digest(root: str) -> str:
    from ..data import remote
    if remote.is_url(root):   # every rank reads the URL itself: no shared folder, the same manifest
        return hashlib.sha256((remote.fetch_manifest(root) / "manifest.json").read_bytes()).hexdigest()[:16]
    try:
        return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return "no manifest.json"


def agree(what: str, mine: Any, where: List[Dict[str, Any]] | None = None) -> List[Any]:
    """Every rank's `mine`; raises on every rank when one differs from rank 0's."""
    views = gather_objects({"value": mine, **my_view()})
    ref = views[0]
    for rank, v in enumerate(views):
        if v["value"] != ref["value"]:
            raise ConfigError(f"rank {rank} (node {v['node']}, host {v['host']}) does not see {what} as rank 0 "
                              f"(node {ref['node']}, host {ref['host']}) does ({v['value']} vs {ref['value']}): "
                              f"{SHARED_FS}")
    return views


def check_run_dir(run_dir: str | Path, resume: bool) -> List[Dict[str, Any]]:
    """Rank 0 wrote its host and PID into RUN/.lock before the ranks met; every rank must read the same."""
    return agree(f"the run directory {run_dir}", {"lock": _lock_token(Path(run_dir)), "resume": resume})


def check_shard_roots(roots: Iterable[str]) -> None:
    """After rank 0 built or found the shard sets: every rank reads the same manifests."""
    for root in dict.fromkeys(str(r) for r in roots):
        agree(f"the shard set {root}", _manifest_digest(root))


def init_restarted_group(backend: str, timeout) -> bool:
    """A worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) makes the default process group
    itself, on the launcher's store under a prefix of its attempt: torch 2.14 reuses that store across
    attempts without one, so gloo read the dead attempt's addresses ("connectFullMesh failed ... Connection
    refused") and each such failure used up a restart. Accelerate then finds the group made and keeps it.
    Only on the agent's shared store: without it (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, what multi-node elastic
    jobs need, docs/clusters.md) every round has a fresh store, and the restart counts of agents on different
    nodes differ, so a prefix of the attempt would split the world in two."""
    import torch.distributed as dist
    from torch.distributed.rendezvous import _create_c10d_store

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if not shared or attempt == 0 or dist.is_initialized() or "MASTER_ADDR" not in os.environ \
            or "WORLD_SIZE" not in os.environ:
        return False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"mclfir/attempt_{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)
    return True
