"""The public surface is small and deliberate: these tests pin it, package by package."""

import importlib
import inspect

import pytest

import stagewise


def test_public_names() -> None:
    assert sorted(stagewise.__all__) == sorted([
        "ModelSpec", "load_model_spec", "split", "SplitModel", "SplitError", "Partition", "Stage", "StageSpec",
        "TrainConfig", "Trainer", "TrainResult", "train_reference", "StagewiseError", "ConfigError", "__version__"])
    for name in stagewise.__all__:
        assert hasattr(stagewise, name), name


def test_cli_help_lists_commands(capsys) -> None:
    from stagewise.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("split", "train"):
        assert command in out


PACKAGE_NAMES = {
    "stagewise.split": ["CaptureError", "PackError", "Partition", "ReadWeights", "SavedBytes", "SplitError",
                        "SplitModel", "Stage", "StageCall", "StagePack", "StageSpec", "TreeSpec", "UnitInfo",
                        "UnitTimes", "ValueSpec", "as_leaf", "cast_meta_params", "exact_ints", "flatten",
                        "held_param_bytes", "input_leaves", "materialise", "min_max_cuts", "params_on_meta", "release",
                        "run_stages", "split", "tensor_aliases", "time_units", "unflatten"],
    "stagewise.schedule": ["Action", "ActionKind", "COMM_KINDS", "COMPUTE_KINDS", "CompiledSchedule", "Cost",
                           "Interval", "SCHEDULE_NAMES", "Schedule", "ScheduleError", "ScheduleName", "Sharing",
                           "Timeline", "add_communication", "build", "build_compiled", "compile_schedule", "gpipe",
                           "interleaved_1f1b", "one_f_one_b", "peak_activations", "simulate", "validate",
                           "zero_bubble"],
    "stagewise.comm": ["BoundaryMismatchError", "CommError", "CommGroup", "CommTimeoutError", "DTYPE_CODES",
                       "DistTransport", "FramingError", "LocalHub", "LocalTransport", "ReduceOp", "SendHandle",
                       "RendezvousError", "ShmTransport", "SpawnError", "Transport", "TransportClosedError", "Value",
                       "check_expect", "find_free_port", "interface_address", "interface_towards",
                       "remove_shm_segments",
                       "rendezvous_store", "use_interface"],
    "stagewise.runtime": ["Forward", "PipelineExecutor", "StepError", "TimelineEvent", "all_reduce_grads",
                          "broadcast_params", "clip_global_norm", "measured_bubble", "merge_traces", "render_timeline",
                          "run_forward", "stage_costs_from_events", "timeline_figure", "write_markers",
                          "write_rank_trace"],
    "stagewise.train": ["DataConfig", "LayoutConfig", "OPTIMIZERS", "OptimConfig", "OutputConfig", "RecoveryConfig",
                        "PlanCheck", "RuntimeConfig", "SplitConfig", "StartConfig", "TrainConfig", "TrainResult",
                        "Trainer", "train_reference", "verify_plans"],
    "stagewise.serve": ["BackendError", "BadRequestError", "BatchingConfig", "ClientDisconnectedError", "DATATYPES",
                        "DynamicBatcher", "Gateway", "GatewayConfig", "GatewayMetrics", "GatewayTimeoutError",
                        "GenerateBackend", "GenerateConfig", "HttpLimits", "InferRequest", "InferenceBackend",
                        "LocalBackend", "ModelError", "ModelMetadata", "ModelNotFoundError", "PayloadTooLargeError",
                        "PipelineBackend", "PipelineConfig", "ReplicaStatus", "RequestInput", "RequestedOutput",
                        "RunningServer", "ServeError", "ServiceUnavailableError", "TensorMetadata", "UnauthorizedError",
                        "UnsupportedMediaTypeError", "VersionedOutputs", "add_generate_parsers", "add_infer_parser",
                        "add_serve_parser", "add_worker_parser", "cmd_infer", "cmd_serve", "create_app",
                        "create_generate_app", "datatype_of", "decode_bytes_elements", "encode_bytes_elements",
                        "encode_infer_response", "parse_infer_request", "run", "serve_app", "should_wait",
                        "validate_inputs"],
    "stagewise.plan": ["Calibration", "ChainProfile", "Cluster", "DEVICE_KINDS", "HostLink", "LinkMeasurement", "MODES",
                       "Node", "OPTIMIZER_SECONDS_PER_BYTE", "Plan", "PlanError", "RANK_ORDERS", "RankOrder",
                       "STATE_FACTORS", "TRAIN_SCHEDULES", "Verified", "allreduce_time", "apply_measurement",
                       "auto_threads", "capped_min_max_cuts", "nested_live", "optimizer_time", "pipeline_lower_bound",
                       "predict", "profile_chain", "profile_rows", "rank_of", "search", "set_host_links",
                       "stage_memory", "transfer_time"],
    "stagewise.checkpoint": ["Checkpoint", "CheckpointError", "CheckpointWriter", "Verify", "add_checkpoint_parser",
                             "cmd_checkpoint_export", "cmd_checkpoint_info", "export_pretrained", "export_state_dict",
                             "export_tensors", "format_info", "latest_checkpoint", "list_checkpoints",
                             "load_checkpoint", "load_optimizer_state", "optimizer_state_by_fqn", "restore_rng_state",
                             "rng_state_json", "tied_groups"],
    "stagewise.weights": ["WeightSource", "WeightsError", "hf_folder_spec", "is_hf_folder", "open_weights"],
    "stagewise.zoo": ["ALL_MODELS", "BASIC_MODELS", "HF_MODELS", "Samples", "get"],
    "stagewise.launch": ["STOP_SIGNAL", "SpawnError", "TorchrunEnv", "calibrate", "connect_torchrun", "describe_exit",
                         "forkserver_context", "measure_action_overhead", "measure_host_links", "measure_links",
                         "profile_model", "ray_spawn", "rendezvous_host", "spawn", "stop_requested", "time_optimizer",
                         "torchrun_env"],
}
"""Every package's ``__all__``: a name added or removed is a deliberate change to this list."""


@pytest.mark.parametrize("package", sorted(PACKAGE_NAMES))
def test_package_public_names(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PACKAGE_NAMES[package])
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name}"


def test_every_package_is_pinned() -> None:
    """A new subpackage gets its names pinned above."""
    import pkgutil

    packages = {f"stagewise.{m.name}" for m in pkgutil.iter_modules(stagewise.__path__) if m.ispkg}
    assert packages == set(PACKAGE_NAMES)


def test_every_public_exception_derives_from_stagewise_error() -> None:
    errors = []
    for package in ["stagewise", *PACKAGE_NAMES]:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                errors.append(obj)
                assert issubclass(obj, stagewise.StagewiseError), f"{package}.{name} does not derive StagewiseError"
    assert len(errors) >= 20  # the walk found the exception classes (a broken walk would pass vacuously)
    # Callers' ``except ValueError`` / ``TimeoutError`` keep working: each keeps the builtin it refines.
    from stagewise.comm import CommTimeoutError
    from stagewise.serve._channel import ChannelError

    assert issubclass(stagewise.SplitError, ValueError) and issubclass(stagewise.ConfigError, ValueError)
    assert issubclass(CommTimeoutError, TimeoutError) and issubclass(ChannelError, ConnectionError)
