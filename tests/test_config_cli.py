"""Config trees and the command line generated from them: one place for every default, choice and help text."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Literal

import pytest

from stagewise import ConfigError
from stagewise._cli_config import add_config_arguments, config_values
from stagewise._settings import field_docs, settings_of
from stagewise.cli import build_parser
from stagewise.schedule import SCHEDULE_NAMES, ScheduleName
from stagewise.serve import PipelineConfig
from stagewise.train import LayoutConfig, TrainConfig


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _option(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def test_every_train_setting_has_a_flag_with_its_default_and_doc_in_help() -> None:
    parser = _subparser("train")
    help_text = "".join(parser.format_help().split())  # argparse wraps lines, also at hyphens
    settings = settings_of(TrainConfig)
    assert len(settings) >= 35  # the whole tree was walked, not just the top level
    for s in settings:
        assert s.doc, f"{s.name} has no docstring"
        action = _option(parser, s.name)
        assert action.help is not None and action.help.startswith(s.doc.replace("%", "%%"))
        if s.required:
            assert action.option_strings == []  # model: the positional MODEL
            continue
        assert s.flag in action.option_strings
        assert action.default == s.default
        formatted = parser._get_formatter()._expand_help(action)
        assert formatted.endswith(")") and "(default: " in formatted and "".join(formatted.split()) in help_text


def test_literal_settings_become_choices() -> None:
    parser = _subparser("train")
    assert tuple(_option(parser, "schedule").choices) == SCHEDULE_NAMES  # one list, in schedule/
    assert tuple(_option(parser, "device").choices) == ("cpu", "cuda", "auto")
    assert tuple(_option(parser, "sharding").choices) == ("shard", "replicate")
    assert typing.get_type_hints(LayoutConfig)["schedule"] == ScheduleName
    with pytest.raises(SystemExit):
        parser.parse_args(["m:f", "--schedule", "nope"])


def test_kept_flag_names_and_toggles() -> None:
    parser = _subparser("train")
    args = parser.parse_args(["m:f", "--plan", "p.json", "--out", "o", "--save", "s", "--no-shuffle",
                              "--no-dropout", "--cuts", "a, b", "--optimizer-kwargs", '{"momentum": 0.9}',
                              "--optimizer", "sgd", "--data", "replicate", "--clip-grad-norm", "1.5"])
    config = TrainConfig(**config_values(TrainConfig, args))
    assert (config.split.partition, config.output.out_dir, config.output.save_dir) == ("p.json", "o", "s")
    assert not config.data.shuffle and not config.split.dropout and config.data.sharding == "replicate"
    assert config.split.cuts == ["a", "b"] and config.optim.optimizer_kwargs == {"momentum": 0.9}
    assert config.optim.clip_grad_norm == 1.5
    assert parser.parse_args(["m:f", "--shuffle"]).shuffle is True
    with pytest.raises(SystemExit):
        parser.parse_args(["m:f", "--optimizer-kwargs", "[1, 2]"])  # a JSON list is not keyword arguments


def test_cli_to_config_to_json_round_trip() -> None:
    argv = ["stagewise.zoo.basic:mlp", "--stages", "3", "--replicas", "2", "--microbatches", "2", "--global-batch",
            "12", "--schedule", "gpipe", "--lr", "0.01", "--lr-schedule", "cosine", "--warmup-steps", "2",
            "--device", "auto", "--keep", "5", "--trace", "t", "--no-progress", "--steps", "7"]
    config = TrainConfig(**config_values(TrainConfig, _subparser("train").parse_args(argv)))
    again = TrainConfig.from_json(config.to_json())
    assert again == config
    assert (again.layout.stages, again.layout.replicas, again.data.global_batch, again.steps) == (3, 2, 12, 7)
    assert (again.optim.lr, again.runtime.device, again.output.keep, again.output.progress) == (0.01, "auto", 5, False)
    assert config.world_size == 6 and config.microbatch_size == 3


def test_flat_and_grouped_construction_agree() -> None:
    flat = TrainConfig(model="m:f", stages=4, microbatches=2, global_batch=8, lr=0.5)
    grouped = TrainConfig(model="m:f", layout=LayoutConfig(stages=4, microbatches=2), data={"global_batch": 8},
                          optim={"lr": 0.5})
    assert flat == grouped
    # A leaf next to its group applies on top of it, so dataclasses.replace takes leaf names too.
    assert dataclasses.replace(flat, stages=2).layout == LayoutConfig(stages=2, microbatches=2)
    with pytest.raises(ConfigError, match="no setting 'stagse'; did you mean 'stages'"):
        TrainConfig(model="m:f", stagse=2)
    with pytest.raises(ConfigError, match="needs model="):
        TrainConfig(stages=2)


@pytest.mark.parametrize(("settings", "match"), [
    ({"stages": 0}, "stages must be >= 1, got 0; set --stages"),
    ({"device": "gpu"}, "device must be one of cpu, cuda, auto, got 'gpu'; set --device"),
    ({"sharding": "all"}, "sharding must be one of shard, replicate, got 'all'; set --data"),
    ({"stages_per_rank": 2}, "set --schedule interleaved or --stages-per-rank 1"),
    ({"optimizer": "adamm"}, "unknown optimizer 'adamm'; set --optimizer"),
    ({"keep": 0}, "keep must be >= 1, got 0; set --keep"),
    ({"timeout": 0}, "timeout must be > 0"),
])
def test_config_errors_name_the_flag(settings: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        TrainConfig(model="m:f", **settings)
    assert isinstance(info.value, ValueError)  # callers' except ValueError keeps working


def test_a_new_field_is_a_new_flag_with_no_cli_edit() -> None:
    @dataclasses.dataclass(kw_only=True, slots=True)
    class Demo:
        name: str
        """What to run."""
        colour: Literal["red", "blue"] = "red"
        """Paint, in 5% steps."""
        sizes: tuple[str, ...] = ("s",)
        """Sizes to try."""
        fast: bool = False
        """Go fast."""

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo)
    assert field_docs(Demo)["colour"] == "Paint, in 5% steps."
    args = parser.parse_args(["x", "--colour", "blue", "--sizes", "m,l", "--fast"])
    assert Demo(**config_values(Demo, args)) == Demo(name="x", colour="blue", sizes=("m", "l"), fast=True)
    assert "Paint, in 5% steps. (default: red)" in " ".join(parser.format_help().split())


def test_serve_flags_come_from_pipeline_config() -> None:
    parser = _subparser("serve")
    for s in settings_of(PipelineConfig):
        if not s.field.metadata.get("cli", True) or s.required:
            continue
        action = _option(parser, s.name)
        assert s.flag in action.option_strings and action.default == s.default
        assert action.help is not None and action.help.startswith(s.doc.replace("%", "%%"))
    args = parser.parse_args(["m:f", "--threads", "2", "--max-batch-size", "8", "--dtype", "bfloat16",
                              "--exclude-inputs", "labels,mask", "--worker-timeout", "5"])
    values = config_values(PipelineConfig, args)
    config = PipelineConfig(**values)
    assert (config.threads_per_worker, config.max_batch_size, config.dtype) == (2, 8, "bfloat16")
    assert config.exclude_inputs == ("labels", "mask") and config.worker_timeout_s == 5.0
    assert args.host == "127.0.0.1"  # the HTTP address, not PipelineConfig.host (the workers' channel)
