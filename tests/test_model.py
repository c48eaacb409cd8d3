"""Trunks, heads and freezing."""
import pytest
import torch

from mclfir_dist.config import ConfigError, ModelConfig
from mclfir_dist.model.mclfir import build_model, convert_sync_batchnorm


def test_resnet_cut_shapes():
    m = build_model(ModelConfig(trunk="resnet18", cut="layer3", head_channels=32, embed_dim=16), 64)
    assert m.trunk(torch.randn(2, 3, 64, 64)).shape == (2, 256, 4, 4)
    full = build_model(ModelConfig(trunk="resnet18", cut="full"), 64)
    assert full.trunk(torch.randn(1, 3, 64, 64)).shape[1] == 512


def test_efficientnet_lite0_pretrained_loads_offline():
    from mclfir_dist.model.trunks import lite0_weights_path
    m = build_model(ModelConfig(trunk="efficientnet_lite0", pretrained=True, head_channels=32, embed_dim=16), 96)
    ref = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(m.trunk.net._conv_stem.weight, ref["_conv_stem.weight"])
    assert m.trunk(torch.randn(1, 3, 96, 96)).shape == (1, 1280, 3, 3)


def test_local_weights_file(tmp_path):
    import torchvision
    r = torchvision.models.resnet18()
    torch.save(r.state_dict(), tmp_path / "w.pt")
    m = build_model(ModelConfig(trunk="resnet18", weights=str(tmp_path / "w.pt")), 64)
    torch.testing.assert_close(m.trunk.stem[0].weight, r.conv1.weight)
    with pytest.raises(ConfigError, match="not found"):
        build_model(ModelConfig(trunk="resnet18", weights=str(tmp_path / "missing.pt")), 64)
    with pytest.raises(ConfigError, match="no offline ImageNet weights"):
        build_model(ModelConfig(trunk="resnet50", pretrained=True), 64)


def test_frozen_heads_stay_bit_identical_while_training():
    torch.manual_seed(0)
    m = build_model(ModelConfig(trunk="resnet18", head_channels=32, embed_dim=16), 32)
    m.add_head("old")
    m.train()
    x = torch.randn(8, 3, 32, 32)
    m(x, torch.zeros(8, dtype=torch.long), ["old"])  # populate BN stats like a real first increment
    m.add_head("new")
    m.configure(train_heads=["new"], frozen_heads=["old"], train_trunk=True)
    snapshot = {k: v.clone() for k, v in m.heads["old"].state_dict().items()}
    params = [p for p in m.parameters() if p.requires_grad]
    assert not any(p is q for p in params for q in m.heads["old"].parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        m.train()
        emb, pooled, fmap = m(x, torch.zeros(8, dtype=torch.long), ["new"])
        old = m.heads["old"](fmap)  # used for distillation: gradients pass through, weights do not move
        (emb.sum() + old.sum()).backward()
        opt.step()
        opt.zero_grad()
    for k, v in m.heads["old"].state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert not m.heads["old"].training


def test_sync_batchnorm_refused_on_cpu():
    m = build_model(ModelConfig(), 32)
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        convert_sync_batchnorm(m, on_gpu=False)


@pytest.mark.parametrize("trunk_bn", ["train", "frozen"])
def test_trunk_batchnorm_mode(trunk_bn):
    """trunk_bn=frozen keeps the pretrained running statistics through train() and training steps,
    while the BatchNorm affine weights, the rest of the trunk and the heads still learn."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(trunk="resnet18", head_channels=32, embed_dim=16, trunk_bn=trunk_bn), 32)
    m.add_head("a")
    bn = m.trunk.stem[1]
    stats_before = bn.running_mean.clone()
    weight_before = bn.weight.detach().clone()
    m.train()
    assert m.heads["a"].training and m.trunk.training
    assert bn.training == (trunk_bn == "train")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    emb, _, _ = m(torch.randn(8, 3, 32, 32) * 3 + 1, torch.zeros(8, dtype=torch.long), ["a"])
    emb.sum().backward()
    opt.step()
    assert not torch.equal(bn.weight.detach(), weight_before)
    assert torch.equal(bn.running_mean, stats_before) == (trunk_bn == "frozen")


def test_rows_are_routed_to_their_heads_with_or_without_host_counts():
    """Each row is embedded by its task's head, whatever the order of the rows; the host-count path
    (argsort + host slices, no device read) equals the counted one and a row-by-row reference.
    Heads run in eval mode here so that a row's embedding does not depend on which rows share its call."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(trunk="resnet18", head_channels=32, embed_dim=16), 32)
    for a in ("a", "b", "c"):
        m.add_head(a)
    m.eval()
    x = torch.randn(10, 3, 32, 32)
    task = torch.tensor([2, 0, 2, 1, 0, 0, 2, 1, 2, 0])
    counts = torch.bincount(task, minlength=3).tolist()
    with torch.no_grad():
        counted, _, fmap = m(x, task, ["a", "b", "c"])
        routed, _, _ = m(x, task, ["a", "b", "c"], counts)
        reference = torch.stack([m.heads["abc"[t]](fmap[i:i + 1])[0] for i, t in enumerate(task.tolist())])
        torch.testing.assert_close(routed, reference)
        assert torch.equal(routed, counted)
        one, _, _ = m(x, torch.zeros(10, dtype=torch.long), ["b"], [10])   # one head for all rows: no routing
        torch.testing.assert_close(one, m.heads["b"](fmap))
        missing, _, _ = m(x, torch.full((10,), 1), ["a", "b"], [0, 10])  # a task with no rows is skipped
        torch.testing.assert_close(missing, m.heads["b"](fmap))
