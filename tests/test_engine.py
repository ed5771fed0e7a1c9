"""What opt_ds changes inside DeepSpeed's engine, checked against DeepSpeed's own code on real ZeRO-3 partitions."""

from __future__ import annotations

import deepspeed
import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import join_gloo_group, spawn_gloo_ranks
from opt_ds.zero.patches import reduce_gradients_by_all_reduce, use_foreach_grad_norm


def grad_norm_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two ranks: a ZeRO-3 backward, then the gradient norm by the foreach replacement and by DeepSpeed."""
    join_gloo_group(rank, port)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 33), nn.GELU(), nn.Linear(33, 301))  # odd sizes: padded partitions
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    optimizer = engine.optimizer
    installed = use_foreach_grad_norm(optimizer)
    inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank)).bfloat16()
    engine.backward(engine(inputs).float().square().mean())
    grads, params = optimizer.averaged_gradients[0], optimizer.fp16_groups[0]
    ours = optimizer.get_grad_norm_direct(grads, params)
    theirs = type(optimizer).get_grad_norm_direct(optimizer, grads, params)
    grads[0][0] = float("inf")
    not_finite = optimizer.get_grad_norm_direct(grads, params)
    torch.save(
        {"installed": installed, "ours": ours, "theirs": theirs, "not_finite": not_finite}, f"{out_dir}/rank{rank}.pt"
    )
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks initialise DeepSpeed: about a minute here
def test_foreach_grad_norm_equals_deepspeeds_on_two_ranks(tmp_path):
    spawn_gloo_ranks(grad_norm_rank, tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["installed"]
        assert float(got["theirs"]) > 0
        assert float(got["ours"]) == pytest.approx(float(got["theirs"]), rel=1e-6)
        assert float(got["not_finite"]) == -1.0


def reduce_scatter_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two ranks: DeepSpeed's coalesced reduce-scatter of odd-sized (padded) buckets, then by all-reduce."""
    join_gloo_group(rank, port)
    deepspeed.init_distributed("gloo")
    from deepspeed.runtime.comm import coalesced_collectives

    generator = torch.Generator().manual_seed(rank)
    buckets = [
        [torch.randn(n, generator=generator).to(dtype) for n in (301, 8, 64)]
        for dtype in (torch.bfloat16, torch.float32)
    ]
    theirs = [coalesced_collectives.reduce_scatter_coalesced([t.clone() for t in b]) for b in buckets]
    installed = reduce_gradients_by_all_reduce(None)
    ours = [coalesced_collectives.reduce_scatter_coalesced([t.clone() for t in b]) for b in buckets]
    torch.save({"installed": installed, "theirs": theirs, "ours": ours}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks initialise DeepSpeed's communication
def test_gradient_reduction_by_all_reduce_equals_deepspeeds_reduce_scatter(tmp_path):
    spawn_gloo_ranks(reduce_scatter_rank, tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["installed"]
        for theirs, ours in zip(got["theirs"], got["ours"]):
            assert [t.shape for t in ours] == [t.shape for t in theirs]
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parameter_groups_scale_each_components_learning_rate():
    """optim.lr_scale: the decoders' parameters get lr x scale, every other parameter lr; no parameter is in two
    groups or none; biases and norms never decay."""
    from opt_ds.model.config import load_model_config
    from opt_ds.model.opt import OPTModel
    from opt_ds.zero.engine import parameter_groups

    model = OPTModel(load_model_config("tiny"))
    groups = parameter_groups(model, 0.05, 1e-3, {"text_decoder": 3.0, "image_decoder": 2.0})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(lr_of) == len(list(model.parameters()))
    for part, lr in (("text_decoder", 3e-3), ("image_decoder", 2e-3), ("fusion", 1e-3), ("text", 1e-3)):
        assert sorted({lr_of[id(p)] for p in getattr(model, part).parameters()}) == [pytest.approx(lr)], part
    decays = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert all(decays[id(p)] == 0.0 for n, p in model.named_parameters() if n.endswith(".bias") or "norm" in n)
    assert {g["lr"] for g in parameter_groups(model, 0.05, 1e-3, {})} == {1e-3}


class TwoBranches(nn.Module):
    """Two linears with a parameter-free container and activation between them; `use_b` leaves the second out."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.GELU())
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if use_b else h


def zero3_patches_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two ranks: (1) a step that leaves `b` out after a step that used it, with and without clearing the
    gradient buffer (plain SGD: `b` moves only if it gets a gradient); (2) the hooks left after dropping those of
    parameter-free submodules, and the loss with and without them."""
    from opt_ds.zero.patches import clear_stale_gradients, drop_zero3_hooks_without_parameters

    join_gloo_group(rank, port)
    config = {  # plain SGD, so a parameter moves only if it gets a gradient: DeepSpeed must be told it may run it
        "train_micro_batch_size_per_gpu": 4,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    moved, losses, hooks = {}, {}, {}
    for clear in (False, True):
        torch.manual_seed(0)
        model = TwoBranches()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config
        )
        engine.backward(engine(x).square().mean())
        engine.step()
        if clear:
            clear_stale_gradients(engine)
        with deepspeed.zero.GatheredParameters(list(model.b.parameters())):
            before = model.b.weight.detach().clone()
        engine.backward(engine(x, use_b=False).square().mean())
        engine.step()
        with deepspeed.zero.GatheredParameters(list(model.b.parameters())):
            moved[clear] = float((model.b.weight - before).abs().max())
    for drop in (False, True):
        torch.manual_seed(0)
        model = TwoBranches()
        hooks_before = {m: (set(m._forward_pre_hooks), set(m._forward_hooks)) for m in model.modules()}
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config
        )
        dropped = drop_zero3_hooks_without_parameters(model, hooks_before) if drop else 0
        hooks[drop] = {
            "dropped": dropped,
            "sequential": len(model.a._forward_pre_hooks),
            "gelu": len(model.a[1]._forward_pre_hooks),
            "linear": len(model.a[0]._forward_pre_hooks),
        }
        losses[drop] = float(engine(x).square().mean())
    torch.save({"moved": moved, "hooks": hooks, "losses": losses}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks initialise four ZeRO-3 engines
def test_zero3_patches_clear_stale_gradients_and_drop_only_parameter_free_hooks(tmp_path):
    spawn_gloo_ranks(zero3_patches_rank, tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["moved"][False] > 0, "DeepSpeed no longer reapplies a stale gradient: the clearing may be obsolete"
        assert got["moved"][True] == 0, "a parameter left out of the step moved: its old gradient was applied again"
        assert got["hooks"][False]["sequential"] > 0 and got["hooks"][False]["gelu"] > 0
        assert got["hooks"][True] == {"dropped": 2, "sequential": 0, "gelu": 0, "linear": got["hooks"][False]["linear"]}
        assert got["hooks"][True]["linear"] > 0
        assert got["losses"][True] == got["losses"][False]


def test_unverified_deepspeed_versions_leave_speed_patches_out(caplog):
    from opt_ds.zero.patches import VERIFIED_VERSIONS, verified

    assert verified("a patch", VERIFIED_VERSIONS[0])
    assert not verified("a patch", "99.0.0")
    assert "DeepSpeed 99.0.0: a patch was verified on" in caplog.text


def test_missing_gradient_buffer_is_an_error_not_a_silent_stale_update():
    from opt_ds.zero.patches import UnverifiedDeepSpeed, check_stale_gradient_buffer

    class Layout:  # a ZeRO-3 optimizer of a DeepSpeed that keeps gradients elsewhere
        pass

    with pytest.raises(UnverifiedDeepSpeed, match="grad_partitions_flat_buffer"):
        check_stale_gradient_buffer(Layout())
