"""The seed example: three Linear layers in a row, split into pipeline stages.

    stagewise split examples/large_model.py:build --stages 2

``build`` is the factory the command line calls; it returns a ``stagewise.ModelSpec`` (the model, example inputs of
shape (4, 10), an MSE loss and a synthetic regression dataset). The model itself lives in ``stagewise.zoo.basic``:

    class LargeModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Linear(10, 20)
            self.layer2 = nn.Linear(20, 30)
            self.layer3 = nn.Linear(30, 40)

        def forward(self, x):
            return self.layer3(self.layer2(self.layer1(x)))
"""

from __future__ import annotations

from stagewise._spec import ModelSpec
from stagewise.zoo.basic import large_model


def build(*, batch: int = 4) -> ModelSpec:
    """The seed example with deterministic weights and a (batch, 10) example input."""
    return large_model(batch=batch)


if __name__ == "__main__":
    spec = build()
    print(spec.model)
    print("output shape:", tuple(spec.model(*spec.args).shape))
