"""The optimizer's kernels (optim.implementation): what auto picks, and that each choice is the same AdamW."""
import types

import pytest
import torch

from conftest import ROOT
from mclfir_dist.config import ConfigError
from mclfir_dist.configure import load_config
from mclfir_dist.methods.optim import build_optimizer, kernel_options


def _param(device: str, floating: bool = True):
    # stands in for a parameter on a device this machine may not have: the rule reads these two only
    return types.SimpleNamespace(device=torch.device(device), is_floating_point=lambda: floating)


def test_auto_fuses_on_cuda_and_leaves_the_cpu_default():
    assert kernel_options("auto", [_param("cuda"), _param("cuda")]) == {"fused": True}
    assert kernel_options("auto", [_param("cuda"), _param("cpu")]) == {}
    assert kernel_options("auto", [_param("cuda", floating=False)]) == {}
    assert kernel_options("auto", [torch.nn.Parameter(torch.zeros(2))]) == {}   # CPU: torch's default loop
    assert kernel_options("auto", []) == {}
    if torch.cuda.is_available():
        assert kernel_options("auto", [torch.nn.Parameter(torch.zeros(2, device="cuda"))]) == {"fused": True}
    assert kernel_options("foreach", [_param("cpu")]) == {"foreach": True}
    assert kernel_options("for_loop", [_param("cuda")]) == {"foreach": False}


def test_unknown_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.implementation"):
        load_config(ROOT / "configs/debug_cpu.yaml", ["optim.implementation=apex"])


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for_loop"])
def test_every_implementation_takes_the_same_steps(implementation):
    """Same model, same gradients, both parameter groups (encoder at its lr scale, heads): the updates agree
    to float rounding, and the optimizer really runs the kernels asked for."""
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", ["optim.weight_decay=0.05"]).optim

    def run(impl):
        torch.manual_seed(0)
        trunk, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        cfg.implementation = impl
        opt = build_optimizer(cfg, trunk, [head], encoder_lr_scale=0.1)
        for step in range(5):
            torch.manual_seed(100 + step)
            head(trunk(torch.randn(8, 16))).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return opt, [p.detach() for p in [*trunk.parameters(), *head.parameters()]]

    opt, weights = run(implementation)
    _, reference = run("for_loop")
    assert [g["name"] for g in opt.param_groups] == ["encoder", "heads"]
    group = opt.param_groups[0]
    assert (bool(group["fused"]), bool(group["foreach"])) == {"fused": (True, False), "foreach": (False, True),
                                                              "for_loop": (False, False)}[implementation]
    for w, ref in zip(weights, reference):
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
