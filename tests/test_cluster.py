"""Clusters as they are: two "nodes" on localhost, a real SLURM cluster on this machine (slurm-wlm: slurmctld
and two slurmd), requeue and preemption, and launches that are refused. Every end is compared bit for bit
with a 2-process run on one node (same world size, same global batch).

Needs root and Debian's slurm-wlm: `bash scripts/setup_cluster.sh` installs it (`make test` and .ci/run do)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from test_signals import ACCELERATE_2PROC, TINY, env, same_end

pytestmark = pytest.mark.cluster

EVERY_STEP = TINY + ["train.log_every=1"]
MULTINODE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/multinode_cpu.yaml")]


def train_args(run: Path, shards: Path, *extra):
    return ["--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(run), "--resume", "auto",
            f"data.shards={shards}", *EVERY_STEP, *extra]


def node_command(rank: int, port: str, run: Path, shards: Path, prefix=(), extra=()):
    return [*prefix, *MULTINODE, "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "mclfir_dist.train",
            *train_args(run, shards, *extra)]


def two_nodes(run: Path, shards, prefix_node1=(), extra=()):
    """Two launches, one process each, as two nodes would run them; (exit codes, outputs)."""
    port = free_port()
    procs = [subprocess.Popen(node_command(r, port, run, shards, prefix_node1 if r else (), extra), cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Shards, and the 2-process single-node run every cluster run must equal."""
    work = tmp_path_factory.mktemp("cluster")
    cmd = [*ACCELERATE_2PROC, "--main_process_port", free_port(), "-m", "mclfir_dist.train",
           *train_args(work / "reference", work / "shards")]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return work


def test_two_localhost_nodes_equal_one_node_bit_for_bit(reference, tmp_path):
    run = tmp_path / "run"
    codes, outs = two_nodes(run, reference / "shards")
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    result = json.loads((run / "results.json").read_text())
    assert (result["world_size"], result["nodes"], result["backend"]) == (2, 2, "gloo")
    # the InfoNCE pool: every rank's batch, gathered (world x per-rank batch)
    assert all(c["global_batch"] == 2 * c["per_rank_batch"] == 2 * 2 * 8 for c in result["cost"])
    assert same_end(run, reference / "reference")


def test_cpu_flag_with_two_machines_is_refused(reference, tmp_path):
    """`--cpu` starts one lone process per launch: two "nodes" would each train a world-1 run into one --out."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "2", "--num_processes", "2",
           "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", free_port(),
           "-m", "mclfir_dist.train", *train_args(tmp_path / "run", reference / "shards")]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]   # ours exits 2; accelerate's launcher then 1
    err = [l for l in p.stderr.splitlines() if "mclfir train" in l]
    assert len(err) == 1 and "--cpu" in err[0] and "multinode_cpu.yaml" in err[0], p.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("hidden", ["shards", "run"])
def test_a_node_that_does_not_see_the_shared_folders_is_refused(reference, tmp_path, hidden):
    """Node 1 runs in its own mount namespace with an empty tmpfs over the folder: a node without the
    shared filesystem. Both nodes stop with one line naming the folder, the rank and the host."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and util-linux's unshare (CI runs as root)")
    run = tmp_path / "run"
    run.mkdir()
    folder = reference / "shards" if hidden == "shards" else run
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs none "{folder}" && exec "$@"', "node1"]
    codes, outs = two_nodes(run, reference / "shards", prefix)
    # each worker exits 2 with the line; the launcher around it then exits 1 with its own report
    assert all(c != 0 for c in codes), outs[0][-3000:] + outs[1][-3000:]
    for out in outs:
        line = [l for l in out.splitlines() if "mclfir train: error" in l]
        assert len(line) == 1 and f"does not see the {'shard set' if hidden == 'shards' else 'run directory'} " \
               f"{folder}" in line[0] and "rank 1" in line[0] and "shared filesystem" in line[0], out[-3000:]
    assert not (run / "results.json").exists() and not (run / "checkpoints").exists()


@pytest.fixture
def served_shards(reference, tmp_path):
    """The reference shard set served over HTTP by nginx (tests/test_remote_shards.py), and its URL."""
    from test_remote_shards import NGINX, Nginx
    if NGINX is None:
        pytest.fail("nginx is not installed: run `bash scripts/setup_nginx.sh` as root (make test does)")
    server = Nginx(reference, tmp_path / "nginx")
    yield server.url("shards/")
    server.stop()


def test_two_nodes_without_the_shard_folder_read_it_over_http(reference, tmp_path, served_shards):
    """Node 1 has neither the shard folder nor node 0's cache (tmpfs over both in its own mount namespace):
    each rank fetches the set from the URL into its own cache; the run equals the one-node run bit for bit."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and util-linux's unshare (CI runs as root)")
    run, cache = tmp_path / "run", tmp_path / "cache"
    cache.mkdir()
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs none "{reference / "shards"}" && mount -t tmpfs none "{cache}" && exec "$@"', "node1"]
    codes, outs = two_nodes(run, served_shards, prefix, [f"data.cache_dir={cache}"])
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert same_end(run, reference / "reference")
    result = json.loads((run / "results.json").read_text())
    assert result["remote_shards"][served_shards]["downloaded_bytes"] > 0 and result["nodes"] == 2


# ---------------------------------------------------------------- SLURM on this machine

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None:
        pytest.fail("slurm-wlm is not installed: run `bash scripts/setup_cluster.sh` as root (make test does)")
    state = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(ROOT / "scripts/slurm_local.sh"), "start", str(state)], capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    yield dict(env(), SLURM_CONF=str(state / "slurm.conf"))
    subprocess.run(["bash", str(ROOT / "scripts/slurm_local.sh"), "stop", str(state)], timeout=60)


def submit(slurm_env, run: Path, shards, log: Path, *more) -> str:
    extra = [a for a in EVERY_STEP] + [f"data.shards={shards}", *more]
    p = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(ROOT / "launch/slurm_cpu.sbatch"), *extra],
                       cwd=ROOT, env=dict(slurm_env, OUT=str(run)), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job(slurm_env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], env=slurm_env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(slurm_env, job_id: str, states, timeout=400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(slurm_env, job_id)
        if info.get("JobState") in states:
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            # SLURM holds a requeued batch job for about two minutes; a real cluster would wait, the test need not
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_env, timeout=30)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {states}: {job(slurm_env, job_id)}")


def wait_for_line(log: Path, text: str, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {log}")


def test_sbatch_runs_two_nodes_to_the_end(slurm, reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    info = wait_for(slurm, submit(slurm, run, reference / "shards", log), {"COMPLETED", "FAILED", "CANCELLED"})
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    result = json.loads((run / "results.json").read_text())
    assert (result["world_size"], result["nodes"]) == (2, 2)
    assert same_end(run, reference / "reference")


def test_sbatch_reads_the_shards_over_http(slurm, reference, tmp_path, served_shards):
    run, log = tmp_path / "run", tmp_path / "job.out"
    job_id = submit(slurm, run, served_shards, log, f"data.cache_dir={tmp_path / 'cache'}")
    info = wait_for(slurm, job_id, {"COMPLETED", "FAILED", "CANCELLED"})
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert json.loads((run / "results.json").read_text())["remote_shards"][served_shards]["manifest_sha256"]
    assert same_end(run, reference / "reference")


@pytest.mark.parametrize("how", ["scontrol requeue", "preemption signal USR1"])
def test_a_requeued_or_preempted_job_continues_the_same_run_exactly(slurm, reference, tmp_path, how):
    """`scontrol requeue` (SIGTERM to every task, then the job goes back to the queue) and SLURM's warning
    signal (`--signal=USR1@N`; here sent at once with `scancel --signal=USR1`), after which rank 0 requeues
    the job itself. The job keeps its ID, finds its run and continues it with --resume auto."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    job_id = submit(slurm, run, reference / "shards", log)
    wait_for_line(log, "inc 1 step 3/")
    if how == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", job_id], env=slurm, check=True, timeout=30)
    else:
        subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm, check=True, timeout=30)
    info = wait_for(slurm, job_id, {"COMPLETED", "FAILED", "CANCELLED"})
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    name = "SIGTERM" if how == "scontrol requeue" else "SIGUSR1"
    assert f"mclfir train: stopped by {name}: saved" in text and "partial.pt at increment 1" in text, text[-3000:]
    if name == "SIGUSR1":
        assert f"scontrol requeue {job_id}: done" in text, text[-3000:]
    assert "resumed from" in text and "(restart 1)" in text
    assert same_end(run, reference / "reference")


# ---------------------------------------------------------------- elastic restarts

def torchrun(run: Path, shards: Path, port: str, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "mclfir-elastic", "--monitor-interval", "0.5", "-m", "mclfir_dist.train",
            *train_args(run, shards, *extra)]


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_exactly(reference, tmp_path):
    """kill -9 of one worker mid-increment: the agent restarts the worker group by itself (--max-restarts),
    `--resume auto` continues from the last partial, and the end equals the uninterrupted run's. One restart
    only: a restarted group must not trip over the dead attempt's gloo addresses (cluster.init_restarted_group)."""
    run, log = tmp_path / "run", tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.Popen(torchrun(run, reference / "shards", free_port(), "train.checkpoint_every=4"), cwd=ROOT,
                                 env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_line(log, "inc 1 step 6/")
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    killed = time.time()
    os.kill(int(workers[-1]), signal.SIGKILL)
    wait_for_line(log, "resumed from")
    print(f"elastic restart: killed worker to resumed run in {time.time() - killed:.1f} s")
    assert agent.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text(errors="replace")
    assert "continuing at step 4 of increment 1" in text and "connectFullMesh failed" not in text, text[-3000:]
    assert same_end(run, reference / "reference")


def elastic_node(run: Path, shards: Path, port: str):
    """One "node" of a two-node elastic job: its own torchrun agent with one worker, c10d rendezvous."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2:2", "--nproc-per-node", "1",
            "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "mclfir-two-nodes", "--monitor-interval", "0.5", "-m", "mclfir_dist.train",
            *train_args(run, shards, "train.checkpoint_every=4")]


def test_a_killed_node_comes_back_and_the_run_ends_exactly(reference, tmp_path):
    """kill -9 of a whole node (its agent and its worker) mid-increment, then the node starts again, as a
    scheduler or an operator would: the other node's agent restarts its worker, both meet in a new rendezvous
    round, `--resume auto` continues from the partial, and the end equals the uninterrupted run's.
    torch 2.14's shared rendezvous store made that new round hang (the surviving rank-0 agent keeps the old
    round's MASTER_ADDR and never publishes it in the new round); TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is the
    launch setting that avoids it (docs/clusters.md, launch/slurm_step.sh)."""
    run, port = tmp_path / "run", free_port()
    node_env = dict(env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log", tmp_path / "node1_again.log"]

    def start(i):
        with open(logs[i], "w") as out:
            return subprocess.Popen(elastic_node(run, reference / "shards", port), cwd=ROOT, env=node_env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    first = start(0)
    time.sleep(2)                      # node 0 hosts the rendezvous store (its host must stay up: docs)
    second = start(1)
    deadline = time.time() + 300
    while not any("inc 1 step 6/" in log.read_text(errors="replace") for log in logs[:2] if log.is_file()):
        assert time.time() < deadline, logs[0].read_text(errors="replace")[-3000:]
        time.sleep(0.1)
    # the whole node at once: its agent and its worker (torchrun starts workers in their own session)
    node = [second.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(second.pid)], capture_output=True,
                                                          text=True).stdout.split()]
    assert len(node) == 2
    killed = time.time()
    for pid in node:
        os.kill(pid, signal.SIGKILL)
    second.wait()
    again = start(2)
    deadline = time.time() + 300
    while not any("resumed from" in log.read_text(errors="replace") for log in (logs[0], logs[2])):
        assert time.time() < deadline, logs[0].read_text(errors="replace")[-3000:]
        time.sleep(0.1)
    print(f"node restart: killed node to resumed run in {time.time() - killed:.1f} s")
    assert first.wait(timeout=600) == 0, logs[0].read_text(errors="replace")[-3000:]
    assert again.wait(timeout=600) == 0, logs[2].read_text(errors="replace")[-3000:]
    text = logs[0].read_text(errors="replace") + logs[2].read_text(errors="replace")
    assert "continuing at step 4 of increment 1" in text, text[-3000:]
    assert same_end(run, reference / "reference")


def test_a_smaller_world_is_refused_inside_an_increment(reference, tmp_path):
    """An elastic restart that comes back with fewer processes: the partial of 2 is not resumed by 1 (the
    global batch and the InfoNCE pool would change mid-increment) unless train.resume_other_world=true."""
    from test_signals import signal_run
    run = tmp_path / "run"
    two = [*ACCELERATE_2PROC, "--main_process_port", free_port(), "-m", "mclfir_dist.train",
           *train_args(run, reference / "shards")]
    rc, out = signal_run(two, run, signal.SIGTERM, at="inc 1 step 5/")
    assert "partial.pt at increment 1" in out, out[-3000:]
    one = [sys.executable, "-m", "mclfir_dist.cli", "train", *train_args(run, reference / "shards")]
    p = subprocess.run(one, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and "saved by 2 processes" in line[0] and "this launch has 1" in line[0] \
        and "train.resume_other_world=true" in line[0], p.stderr[-3000:]
    p = subprocess.run(one + ["train.resume_other_world=true"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "not bit-exact" in p.stdout + p.stderr, p.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["complete"]


def test_a_slurm_array_of_tune_workers_shares_one_study(slurm, tmp_path):
    """launch/slurm_tune.sbatch: two array tasks, one study (SQLite on the shared folder), 4 finished trials."""
    import sqlite3
    from test_tune import SPACE, TINY
    shards, out = tmp_path / "shards", tmp_path / "tune"
    built = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "shards", "build", "--out", str(shards),
                            "--num-images", "240", "--image-size", "32", "--samples-per-shard", "60",
                            "--min-value-count", "4"], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (tmp_path / "space.yaml").write_text(SPACE)
    p = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1",
                        f"--output={tmp_path}/tune-%a.out", str(ROOT / "launch/slurm_tune.sbatch"),
                        "--space", str(tmp_path / "space.yaml"), *TINY, f"data.shards={shards}"],
                       cwd=ROOT, env=dict(slurm, CONFIG=str(ROOT / "configs/debug_cpu.yaml"), OUT=str(out),
                                          TRIALS="4"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    array = p.stdout.strip().split(";")[0]
    for task in (0, 1):
        info = wait_for(slurm, f"{array}_{task}", {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
        assert info["JobState"] == "COMPLETED", (tmp_path / f"tune-{task}.out").read_text()[-3000:]
    with sqlite3.connect(out / "study.db") as c:
        states = [s for (s,) in c.execute("select state from trials")]
    ran = [int((tmp_path / f"tune-{t}.out").read_text().split("this worker ran ")[1].split()[0]) for t in (0, 1)]
    # one study: the two tasks' trials add up to 4, not 4 each
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 4 == sum(ran), (states, ran)
