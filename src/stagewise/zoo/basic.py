"""Small plain-PyTorch models with deterministic random weights, example inputs, a loss and a dataset.

Every factory takes only keyword arguments with defaults and returns a :class:`stagewise.ModelSpec`. Weights are
seeded inside a forked RNG (the caller's global RNG is left untouched), example inputs and datasets come from a seeded
``torch.Generator``, so two calls give identical models and data. Dim 0 of every tensor input is the batch.

Datasets are map-style: sample ``i`` is ``(inputs, targets)`` where ``inputs`` is a tuple of positional tensors or a
dict of keyword tensors (no batch dim) and ``targets`` is the tuple passed to ``spec.loss(output, *targets)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stagewise._spec import ModelSpec

__all__ = [
    "BASIC_MODELS",
    "KwargsModel",
    "LargeModel",
    "MultiTask",
    "ResNet",
    "ResidualBlock",
    "Samples",
    "cross_entropy_loss",
    "kwargs_model",
    "large_model",
    "load_digits_tensors",
    "mlp",
    "mse_loss",
    "multitask",
    "multitask_loss",
    "resnet",
    "seeded",
]

class Samples(torch.utils.data.Dataset):
    """A map-style dataset of ``(inputs, targets)`` samples cut along dim 0 of batched tensors."""

    def __init__(
        self, inputs: tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor], targets: tuple[torch.Tensor, ...] = ()
    ) -> None:
        self.inputs = dict(inputs) if isinstance(inputs, Mapping) else tuple(inputs)
        self.targets = tuple(targets)
        tensors = [*self._input_tensors(), *self.targets]
        if not tensors:
            raise ValueError("Samples needs at least one input or target tensor")
        lengths = {t.shape[0] for t in tensors}
        if len(lengths) != 1:
            raise ValueError(f"all Samples tensors must share dim 0 (the sample count); got lengths {sorted(lengths)}")
        self._length = lengths.pop()

    def _input_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.inputs.values() if isinstance(self.inputs, dict) else self.inputs

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[Any, tuple[torch.Tensor, ...]]:
        if isinstance(self.inputs, dict):
            inputs: Any = {k: v[index] for k, v in self.inputs.items()}
        else:
            inputs = tuple(t[index] for t in self.inputs)
        return inputs, tuple(t[index] for t in self.targets)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the block (weight init), then restore the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------------------------
# large_model: the seed example, three Linear layers in a row.


class LargeModel(nn.Module):
    """Three Linear layers applied in sequence: (B, 10) -> (B, 40)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(10, 20)
        self.layer2 = nn.Linear(20, 30)
        self.layer3 = nn.Linear(30, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(x)  # (B, 20)
        x = self.layer2(x)  # (B, 30)
        return self.layer3(x)  # (B, 40)


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the model output and the target."""
    return F.mse_loss(output, target)


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of (B, C) logits against (B,) class indices."""
    return F.cross_entropy(logits, target)


def _regression_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A fixed random linear map plus a little noise: learnable by LargeModel (itself linear).
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 40, generator=g) / 10**0.5
    x = torch.randn(n, 10, generator=g)
    return x, x @ w + 0.01 * torch.randn(n, 40, generator=g)


def large_model(*, batch: int = 4, n_samples: int = 512, seed: int = 0) -> ModelSpec:
    """The seed example: ``LargeModel`` on (batch, 10) inputs, MSE loss, synthetic regression pairs."""
    with seeded(seed):
        model = LargeModel()
    x, y = _regression_pairs(batch, seed + 1)

    def dataset() -> Samples:
        xs, ys = _regression_pairs(n_samples, seed + 2)
        return Samples((xs,), (ys,))

    return ModelSpec(model=model, args=(x,), loss=mse_loss, dataset=dataset, name="large_model")


# --------------------------------------------------------------------------------------------------------------------
# mlp: 6 Linear layers on scikit-learn's bundled digits (8x8 images, 10 classes).


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (no download), standardised: (1797, 64) float32 features, (1797,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a test extra, not a core dependency
        raise ImportError("the 'mlp' zoo model needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    std = x.std(dim=0)
    x = (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))  # some border pixels are always 0
    return x, torch.as_tensor(data.target, dtype=torch.long)


def mlp(*, batch: int = 4, hidden: int = 128, seed: int = 0) -> ModelSpec:
    """A 6-layer MLP classifier (``nn.Sequential`` of Linear+ReLU) on the digits data, cross-entropy loss."""
    widths = [64, hidden, hidden, hidden, hidden, hidden // 2, 10]
    with seeded(seed):
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
    # Example inputs are random standardised pixels: building the model (what serving does) never loads the data set
    # (scikit-learn's import alone takes seconds); the data loads when a training rank asks for it.
    x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed + 1))

    def split_order(n: int) -> tuple[torch.Tensor, torch.Tensor]:  # 80% train, 20% held out for evaluate()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
        return order[:n * 4 // 5], order[n * 4 // 5:]

    def dataset() -> Samples:
        xs, ys = load_digits_tensors()
        train, _ = split_order(len(xs))
        return Samples((xs[train],), (ys[train],))

    def evaluate(trained: nn.Module) -> dict[str, float]:
        xs, ys = load_digits_tensors()
        _, held = split_order(len(xs))
        with torch.no_grad():
            pred = trained.eval()(xs[held]).argmax(dim=1)
        return {"accuracy": float((pred == ys[held]).float().mean())}

    return ModelSpec(model=model, args=(x,), loss=cross_entropy_loss, dataset=dataset, evaluate=evaluate,
                     name="mlp")


# --------------------------------------------------------------------------------------------------------------------
# resnet: a small ResNet-style CNN.


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a skip connection (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet(nn.Module):
    """stem -> 4 residual blocks -> global average pool -> linear head: (B, 3, H, W) -> (B, classes)."""

    def __init__(self, *, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(
            ResidualBlock(c, c),
            ResidualBlock(c, 2 * c, stride=2),
            ResidualBlock(2 * c, 2 * c),
            ResidualBlock(2 * c, 4 * c, stride=2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, c, H, W)
        x = self.blocks(x)  # (B, 4c, H/4, W/4)
        return self.head(x)  # (B, classes)


def _class_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Each class is a fixed random template (drawn from the same seed every time); samples add noise to it.
    templates = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g), y


def resnet(*, batch: int = 4, n_samples: int = 512, seed: int = 0) -> ModelSpec:
    """A small ResNet on (batch, 3, 16, 16) images, cross-entropy loss, synthetic class-template images."""
    with seeded(seed):
        model = ResNet()
    x, _ = _class_images(batch, seed + 1)

    def dataset() -> Samples:
        xs, ys = _class_images(n_samples, seed + 2)
        return Samples((xs,), (ys,))

    return ModelSpec(model=model, args=(x,), loss=cross_entropy_loss, dataset=dataset, name="resnet")


# --------------------------------------------------------------------------------------------------------------------
# multitask: a shared trunk and two task heads.


class MultiTask(nn.Module):
    """Shared trunk, then ``heads.cls`` (classes logits) and ``heads.reg`` (one value); returns both in a dict."""

    def __init__(self, *, d_in: int = 16, hidden: int = 64, classes: int = 5) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict(
            {
                "cls": nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, classes)),
                "reg": nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1)),
            }
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)  # (B, hidden)
        return {"cls": self.heads["cls"](h), "reg": self.heads["reg"](h)}  # (B, classes), (B, 1)


def multitask_loss(output: dict[str, torch.Tensor], cls_target: torch.Tensor, reg_target: torch.Tensor) -> torch.Tensor:
    """Cross entropy on the ``cls`` head plus MSE on the ``reg`` head."""
    return F.cross_entropy(output["cls"], cls_target) + F.mse_loss(output["reg"], reg_target)


def _multitask_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(16, 5, generator=torch.Generator().manual_seed(4321))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    cls = (x @ w).argmax(dim=1)  # (n,)
    reg = (x[:, :4].sin().sum(dim=1, keepdim=True) + 0.5 * x[:, 4:5]) / 2  # (n, 1)
    return x, cls, reg


def multitask(*, batch: int = 4, n_samples: int = 512, seed: int = 0) -> ModelSpec:
    """``MultiTask`` on (batch, 16) inputs; loss = CE(cls) + MSE(reg); dataset targets are ``(cls, reg)``."""
    with seeded(seed):
        model = MultiTask()
    x, _, _ = _multitask_data(batch, seed + 1)

    def dataset() -> Samples:
        xs, cls, reg = _multitask_data(n_samples, seed + 2)
        return Samples((xs,), (cls, reg))

    return ModelSpec(model=model, args=(x,), loss=multitask_loss, dataset=dataset, name="multitask")


# --------------------------------------------------------------------------------------------------------------------
# kwargs_model: keyword-only inputs used in the middle and at the end of the network.


class KwargsModel(nn.Module):
    """``forward(x, *, mask=None, scale=1.0, extra=None)``: ``mask`` gates a middle layer; only the head uses ``extra``.

    ``scale`` is a plain float (a constant to a tracer); ``extra`` defaults to zeros so the head's width is fixed.
    """

    def __init__(self, *, d_in: int = 10, hidden: int = 32, d_extra: int = 8, d_out: int = 4) -> None:
        super().__init__()
        self.d_extra = d_extra
        self.layer1 = nn.Linear(d_in, hidden)
        self.layer2 = nn.Linear(hidden, hidden)
        self.layer3 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden + d_extra, d_out)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        scale: float = 1.0,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = torch.relu(self.layer1(x))  # (B, hidden)
        h = torch.relu(self.layer2(h))  # (B, hidden)
        if mask is not None:
            h = h.masked_fill(~mask, 0.0)  # mask: (B, hidden) bool, True keeps a unit
        h = torch.relu(self.layer3(h * scale))  # (B, hidden)
        if extra is None:
            extra = h.new_zeros(h.shape[0], self.d_extra)
        return self.head(torch.cat([h, extra], dim=-1))  # (B, d_out)


def _kwargs_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 10, generator=g),
        "mask": torch.rand(n, 32, generator=g) < 0.8,
        "extra": torch.randn(n, 8, generator=g),
    }


def _kwargs_targets(data: dict[str, torch.Tensor]) -> torch.Tensor:
    w = torch.randn(10, 4, generator=torch.Generator().manual_seed(999))
    return torch.tanh(data["x"] @ w) + data["extra"][:, :4]  # (n, 4)


def kwargs_model(*, batch: int = 4, n_samples: int = 512, scale: float = 0.5, seed: int = 0) -> ModelSpec:
    """``KwargsModel`` called as ``model(x, mask=..., scale=..., extra=...)``, MSE loss.

    Dataset samples carry every tensor input by keyword (``{"x", "mask", "extra"}``); the float ``scale`` is not a
    sample field, so training keeps the example's value from ``spec.kwargs``.
    """
    with seeded(seed):
        model = KwargsModel()
    data = _kwargs_data(batch, seed + 1)
    x = data.pop("x")

    def dataset() -> Samples:
        samples = _kwargs_data(n_samples, seed + 2)
        return Samples(samples, (_kwargs_targets(samples),))

    return ModelSpec(
        model=model,
        args=(x,),
        kwargs={"mask": data["mask"], "scale": scale, "extra": data["extra"]},
        loss=mse_loss,
        dataset=dataset,
        name="kwargs_model",
    )


BASIC_MODELS: dict[str, Callable[..., ModelSpec]] = {
    "large_model": large_model,
    "mlp": mlp,
    "resnet": resnet,
    "multitask": multitask,
    "kwargs_model": kwargs_model,
}
"""Plain-PyTorch zoo models by name."""
