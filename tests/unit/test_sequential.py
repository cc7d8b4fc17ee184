"""The layer-by-layer pipeline knows nothing of quantization: here it runs a small pruning solver
(row-norm input statistics, then the Wanda-style mask |W| * ||x|| keeping half of each row), and what
each layer was solved with is checked against a by-hand replay: the layers outside the blocks on the
whole model first, then each block on the outputs of the pruned blocks before it, every layer of a block
solved from one pass over that block."""

import torch
from torch import nn

from slimtorch.sequential import per_layer, sequential


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class RowNorm:
    """Sum of squares of each input column over every row seen."""

    def __init__(self, layer):
        self.sq = torch.zeros(layer.in_features)

    def add(self, x):
        self.sq += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0).float()


def magnitude_mask(weight, sq):
    """Keep the larger half of each row by |W| * ||x||."""
    score = weight.abs() * sq.sqrt()
    keep = score.topk(weight.shape[1] // 2, dim=1).indices
    return torch.zeros_like(weight).scatter_(1, keep, 1.0)


def prune(name, layer, stats):
    with torch.no_grad():
        layer.weight.mul_(magnitude_mask(layer.weight, stats.sq))
    return layer


def test_a_pruning_solver_runs_block_by_block_on_inputs_from_the_pruned_blocks_before():
    torch.manual_seed(0)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    calib = [(torch.randn(5, 4),) for _ in range(3)]
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    solved = {}

    def recording(name, layer, stats):
        solved[name] = stats.sq.clone()
        return prune(name, layer, stats)

    sequential(net, names, calib, per_layer(RowNorm, recording))

    # by hand: the stem and head first (whole model, nothing pruned yet), then each block on the
    # outputs of the already-pruned blocks before it
    def sq(x):
        return x.reshape(-1, x.shape[-1]).double().pow(2).sum(0).float()

    with torch.no_grad():
        xs = [ref.stem(x) for (x,) in calib]
        head_in = []
        for x in xs:
            h = x
            for b in ref.blocks:
                h = b(h)
            head_in.append(h)
        want = {"stem": sum(sq(x) for (x,) in calib), "head": sum(sq(h) for h in head_in)}
        for layer in ("stem", "head"):
            ref.get_submodule(layer).weight.mul_(magnitude_mask(ref.get_submodule(layer).weight, want[layer]))
        xs = [ref.stem(x) for (x,) in calib]  # the stem was pruned before the blocks ran
        for i, b in enumerate(ref.blocks):
            # one pass gathers every layer's statistics of the block, then each layer is solved
            want[f"blocks.{i}.up"] = sum(sq(x) for x in xs)
            want[f"blocks.{i}.down"] = sum(sq(torch.relu(b.up(x))) for x in xs)
            for layer in (b.up, b.down):
                layer.weight.mul_(magnitude_mask(layer.weight, want[f"blocks.{i}.{'up' if layer is b.up else 'down'}"]))
            xs = [b(x) for x in xs]

    assert solved.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(solved[name], want[name], rtol=1e-5, atol=1e-6)
        w = net.get_submodule(name).weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
        torch.testing.assert_close(w, ref.get_submodule(name).weight)


def test_layers_that_read_one_tensor_share_its_hessian_product():
    # q/k/v-like layers read the same tensor: X^T X is computed once and each layer's H is 2/n X^T X exactly
    from slimtorch.calib.gptq import Hessian
    from slimtorch.sequential import collect

    class Fan(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 3), nn.Linear(6, 5), nn.Linear(3, 2)

        def forward(self, x):  # a and b run one after the other on x, as q/k/v or gate/up do
            h, g = self.a(x), self.b(x)
            return self.c(h) + g.sum(-1, keepdim=True)

    net = Fan()
    xs = [torch.randn(7, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calls = []

    class Counting(Hessian):
        def rows(self, x):
            calls.append(self.layer)
            return super().rows(x)

    stats = collect({"a": net.a, "b": net.b, "c": net.c}, Counting, lambda: [net(x) for x in xs])
    assert calls.count(net.a) + calls.count(net.b) == 3 and calls.count(net.c) == 3  # a and b: one product per input
    x = torch.cat(xs).double()
    assert torch.allclose(stats["a"].H, 2 / 21 * x.T @ x) and torch.equal(stats["a"].H, stats["b"].H)
    assert stats["a"].H is not stats["b"].H  # each solver may damp its own in place
