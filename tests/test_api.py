"""The public surface is small and deliberate: this test pins it."""

import stagewise


def test_public_names() -> None:
    assert sorted(stagewise.__all__) == sorted([
        "ModelSpec", "load_model_spec", "split", "SplitModel", "SplitError", "Partition", "Stage", "StageSpec",
        "TrainConfig", "Trainer", "TrainResult", "train_reference", "__version__"])
    for name in stagewise.__all__:
        assert hasattr(stagewise, name), name


def test_cli_help_lists_commands(capsys) -> None:
    import pytest

    from stagewise.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("split", "train"):
        assert command in out
