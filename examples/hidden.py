"""Half the hidden width in F and G: the alternative to revcompile's default, measured.

revcompile keeps the hidden width of a branch whole in F and G (Note [Slice, don't
pad] in passes/restrict.py): every pretrained hidden unit survives, and for a
BasicBlock F+G cost what the block cost. Halving it would halve that cost but drop
half of each pretrained layer. `halve_hidden` does so for conv-BN-ReLU-conv-BN halves
(torchvision's BasicBlock), keeping the hidden channels with the largest batch-norm
scale, so that `finetune_digits.py --init half-hidden` can compare the two; `reinit`
gives the other starting points it compares.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

import revcompile


def _set(gm: nn.Module, target: str, module: nn.Module) -> None:
    owner, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner), name, module)


def _conv(c: nn.Conv2d, keep: Tensor, axis: int) -> nn.Conv2d:
    w = c.weight.detach().index_select(axis, keep)
    new = nn.Conv2d(
        w.shape[1], w.shape[0], c.kernel_size, c.stride, c.padding, bias=False
    )
    new.weight.data.copy_(w)
    return new


def _norm(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data.copy_(getattr(bn, name).detach()[keep])
    return new


def halve_hidden(half: fx.GraphModule) -> bool:
    """Keep half of the hidden channels of a conv-BN-ReLU-conv-BN `half` in place;
    False (and no change) for any other structure."""
    nodes = [n for n in half.graph.nodes if n.op == "call_module"]
    mods = [half.get_submodule(str(n.target)) for n in nodes]
    kinds = [type(m) for m in mods]
    if kinds != [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]:
        return False
    conv_a, bn_a, _, conv_b, _ = mods
    if conv_a.groups != 1 or conv_b.groups != 1 or conv_a.bias is not None:
        return False
    keep = bn_a.weight.detach().abs().topk(bn_a.num_features // 2).indices.sort()[0]
    _set(half, str(nodes[0].target), _conv(conv_a, keep, 0))
    _set(half, str(nodes[1].target), _norm(bn_a, keep))
    _set(half, str(nodes[3].target), _conv(conv_b, keep, 1))
    return True


def halve_all(converted: nn.Module) -> int:
    """`halve_hidden` on every F and G of every stage; how many were halved."""
    done = 0
    for stage in converted.modules():
        if isinstance(stage, revcompile.ReversibleStage):
            for coupling in stage.couplings:
                for half in coupling.children():  # F and G, or a full-width f
                    done += halve_hidden(half)
    return done


def reinit(converted: nn.Module, init: str) -> None:
    """Other starting points for the branches than slicing, for comparison only.

    ``identity``: the last batch norm of every branch (F, G or f) is zeroed, so each
    coupling starts as the identity (the pretrained branch weights stay, silenced).
    ``random``: every layer of every stage is reset to PyTorch's default init.
    """
    for stage in converted.modules():
        if not isinstance(stage, revcompile.ReversibleStage):
            continue
        for coupling in stage.couplings:
            for half in coupling.children():
                norms = [
                    m
                    for m in half.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)
                ]
                if init == "identity" and norms:
                    nn.init.zeros_(norms[-1].weight)
                    nn.init.zeros_(norms[-1].bias)
                elif init == "random":
                    for m in half.modules():
                        if hasattr(m, "reset_parameters"):
                            m.reset_parameters()


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":  # a quick look: parameters before and after
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    converted = revcompile.convert(model, (torch.randn(2, 3, 32, 32),))
    before = parameters(converted)
    print(halve_all(converted), "halves;", before, "->", parameters(converted))
