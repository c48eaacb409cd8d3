"""Run under `torchrun --standalone --nproc_per_node 2` (gloo). Writes a JSON of measured
differences against a single-process reference to argv[1]:

- gathered doublet InfoNCE (plain, same-value masking, multi-positive): loss and, after DDP
  gradient averaging, parameter gradients vs one process holding the concatenated batch;
- rank-sharded training streams: union of samples of epoch 0 and 1 across ranks;
- distributed evaluation: mAP vs single-process evaluation;
- EMA teacher identical on every rank after N DDP steps.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mclfir_dist.data.pairing import positive_index  # noqa: E402
from mclfir_dist.methods.losses import DoubletInfoNCE  # noqa: E402

out_path, shards = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
report = {"world_size": world}


def make_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 8))


# ---- identical global data on every rank; rank r holds rows [r*n, (r+1)*n)
n_per_rank = 8
g = torch.Generator().manual_seed(123)
x_all = torch.randn(world * n_per_rank, 10, generator=g)
values_all = torch.randint(0, 3, (world * n_per_rank,), generator=g)
task_all = torch.randint(0, 2, (world * n_per_rank,), generator=g)
for r in range(world):  # doublet layout per rank: positives share value and task
    blk = slice(r * n_per_rank, (r + 1) * n_per_rank)
    v, t = values_all[blk], task_all[blk]
    v[n_per_rank // 2:] = v[: n_per_rank // 2]
    t[n_per_rank // 2:] = t[: n_per_rank // 2]
local_pos = positive_index(n_per_rank)
global_pos = torch.cat([r * n_per_rank + local_pos for r in range(world)])

for variant, kw in {"plain": {}, "mask_same_value": {"mask_same_value": True},
                    "multi_positive": {"multi_positive": True}}.items():
    # reference: one process, concatenated batch
    ref_net = make_net()
    ref_emb = F.normalize(ref_net(x_all), dim=1)
    ref_loss, _ = DoubletInfoNCE(0.3, gather=False, **kw)(ref_emb, values_all, task_all, global_pos)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in ref_net.parameters()]
    # distributed: DDP + autograd all-gather, local anchors against the global pool
    net = DDP(make_net())
    blk = slice(rank * n_per_rank, (rank + 1) * n_per_rank)
    emb = F.normalize(net(x_all[blk]), dim=1)
    loss, stats = DoubletInfoNCE(0.3, gather=True, rank=rank, world_size=world, **kw)(
        emb, values_all[blk], task_all[blk], local_pos)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    report[f"{variant}_loss_diff"] = abs(mean_loss.item() - ref_loss.item())
    report[f"{variant}_grad_diff"] = max((p.grad - r).abs().max().item() for p, r in zip(net.parameters(), ref_grads))
    report[f"{variant}_grad_scale"] = max(r.abs().max().item() for r in ref_grads)
    report[f"{variant}_global_batch"] = stats["global_batch"]

# the wrong way, for contrast: gather without gradient, keep only local rows
net = DDP(make_net())
blk = slice(rank * n_per_rank, (rank + 1) * n_per_rank)
emb = F.normalize(net(x_all[blk]), dim=1)
parts = [torch.empty_like(emb) for _ in range(world)]
dist.all_gather(parts, emb.detach())
parts[rank] = emb
wrong, _ = DoubletInfoNCE(0.3, gather=False)(torch.cat(parts), values_all, task_all, global_pos)
wrong.backward()
report["nograd_gather_grad_diff"] = max((p.grad - r).abs().max().item() for p, r in zip(net.parameters(), ref_grads))

# ---- rank-sharded streams
from mclfir_dist.data.manifest import Manifest  # noqa: E402
from mclfir_dist.data.streams import iter_partition  # noqa: E402
m = Manifest.load(shards)
for epoch in (0, 1):
    mine = [s["__key__"] for s in iter_partition(m.shard_files("train"), rank, world, seed=7, epoch=epoch)]
    allk = [None] * world
    dist.all_gather_object(allk, mine)
    flat = [k for part in allk for k in part]
    report[f"epoch{epoch}_union"] = len(set(flat))
    report[f"epoch{epoch}_total_reads"] = len(flat)
    report[f"epoch{epoch}_per_rank"] = [len(p) for p in allk]
report["train_count"] = m.count("train")

# ---- distributed evaluation == single-process evaluation
from mclfir_dist.config import DataConfig, ModelConfig  # noqa: E402
from mclfir_dist.data import build_eval_loader  # noqa: E402
from mclfir_dist.evaluation.metrics import embed_split, evaluate_heads  # noqa: E402
from mclfir_dist.model.mclfir import build_model  # noqa: E402
torch.manual_seed(3)
model = build_model(ModelConfig(head_channels=32, embed_dim=16), 32)
model.add_head("colour")
model.add_head("garment_length")
model.eval()
dcfg = DataConfig(image_size=32, eval_batch_size=50, num_workers=0)
se = embed_split(model, build_eval_loader(dcfg, m, "test", rank, world), ["colour", "garment_length"], torch.device("cpu"))
dist_map = evaluate_heads(m, "test", se)
if rank == 0:
    # single-process reference: this rank alone reads everything, no collectives
    keys, embs, labels = [], [], []
    with torch.no_grad():
        for b in build_eval_loader(dcfg, m, "test", 0, 1):
            e, _ = model.embed_all(b["images"], ["colour", "garment_length"])
            keys += b["keys"]; embs.append(e); labels.append(b["labels"])
    from mclfir_dist.evaluation.metrics import SplitEmbeddings
    order = sorted(range(len(keys)), key=keys.__getitem__)
    idx = torch.tensor(order)
    ref_se = SplitEmbeddings([keys[i] for i in order], torch.cat(labels)[idx], torch.cat(embs)[idx],
                             torch.zeros(len(keys), 1), ["colour", "garment_length"], 0.0)
    ref_map = evaluate_heads(m, "test", ref_se)
    report["eval_map_dist"] = {a: d["map"] for a, d in dist_map.items()}
    report["eval_map_single"] = {a: d["map"] for a, d in ref_map.items()}
    report["eval_rows"] = len(se.keys)

# ---- EMA teacher identical on every rank after N DDP steps
from mclfir_dist.methods.teacher import EMATeacher  # noqa: E402
torch.manual_seed(5)
student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
teacher = EMATeacher(student, decay=0.9)
ddp = DDP(student)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
torch.manual_seed(100 + rank)  # different data per rank
for _ in range(5):
    ddp(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
    opt.step(); opt.zero_grad()
    teacher.update(ddp.module)
flat = torch.cat([p.flatten() for p in teacher.module.parameters()])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
report["teacher_rank_diff"] = max((gathered[0] - t).abs().max().item() for t in gathered)
report["teacher_updates"] = int(teacher.num_updates)

# ---- BatchNorm statistics diverge across ranks (each sees its own batches); broadcast_buffers aligns them
from mclfir_dist.utils.distributed import broadcast_buffers  # noqa: E402
bn = nn.BatchNorm2d(3)
bn.train()(torch.randn(8, 3, 4, 4) + rank)


def buffer_spread():
    flat = torch.cat([b.float().flatten() for b in bn.buffers()])
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)
    return max((parts[0] - t).abs().max().item() for t in parts)


report["buffers_spread_before_sync"] = buffer_spread()
broadcast_buffers([bn])
report["buffers_spread_after_sync"] = buffer_spread()

if rank == 0:
    Path(out_path).write_text(json.dumps(report, indent=2))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: C++ threads of the collectives have aborted it now and then
