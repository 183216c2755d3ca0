"""The runtime's one stage runner (``run_forward``): training mode (autograd leaves at the boundary) and inference mode
(serving: no graph), checked against the model run whole in this process."""

from __future__ import annotations

import torch

from stagewise.runtime import run_forward
from stagewise.split import split


class _Skip(torch.nn.Module):
    """Two values cross the cut (``h`` and ``b(h)``), so the order of what is sent matters."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(self.b(h) * h)


def _split() -> tuple[torch.nn.Module, torch.Tensor, list]:
    torch.manual_seed(0)
    model, x = _Skip(), torch.randn(3, 4)
    sm = split(model, (x,), stages=2, cuts=["c"])
    assert len(sm.stages[0].spec.send) == 2
    return model, x, sm.stages


def test_training_forward_matches_the_model_and_backward_stops_at_the_boundary() -> None:
    model, x, (first, second) = _split()
    a = run_forward(first, [], {"arg0": x}, grad=True)
    assert a.outputs == [] and len(a.send) == 2 and all(v.requires_grad for v in a.send)
    b = run_forward(second, a.send, {}, grad=True)
    torch.testing.assert_close(b.outputs[0], model(x))
    assert all(v.is_leaf and v.requires_grad for v in b.recv)  # fresh leaves, not the sender's tensors
    assert all(r is not s for r, s in zip(b.recv, a.send))
    b.outputs[0].sum().backward()
    assert all(v.grad is not None for v in b.recv)
    assert first.module.a.weight.grad is None  # the graph ends at this stage's inputs, as across processes
    assert b.seconds > 0


def test_inference_forward_records_no_graph_and_matches_training() -> None:
    model, x, (first, second) = _split()
    a = run_forward(first, [], {"arg0": x}, grad=False)
    b = run_forward(second, a.send, {}, grad=False)
    assert all(v.is_inference() for v in [*a.send, *b.outputs])
    assert b.outputs[0].grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(b.outputs[0], model(x))


def test_next_recv_orders_and_subsets_what_is_sent() -> None:
    _, x, (first, _) = _split()
    names = [v.name for v in first.spec.send]
    plain = run_forward(first, [], {"arg0": x}, grad=False)
    flipped = run_forward(first, [], {"arg0": x}, grad=False, next_recv=names[::-1])
    torch.testing.assert_close(flipped.send, plain.send[::-1])
    only = run_forward(first, [], {"arg0": x}, grad=False, next_recv=names[1:])
    assert len(only.send) == 1
    torch.testing.assert_close(only.send[0], plain.send[1])
