"""Layout-free checkpoints: weights and optimizer state keyed by the original model's FQNs, saved per stage and
committed atomically, so any (stages x replicas) layout resumes what any other saved, bit for bit.

On disk (``root/``)::

    step-00000040/               one committed checkpoint (never modified after the commit)
      stage0.model.safetensors   tensors by FQN of the part "stage0"
      stage0.optim.safetensors   optimizer tensors as "{fqn}::exp_avg", "{fqn}::step", ...
      manifest.json              step, partition, per-file sha256 + size, per-tensor shape/dtype, JSON extras
    step-00000050.tmp/           a save in progress (or a crashed one): ignored by loaders, cleaned by writers
    latest                       the name of the newest committed checkpoint

Typical use in a training rank::

    writer = CheckpointWriter(root, keep=3)
    state, meta = optimizer_state_by_fqn(optimizer, stage.named_parameters())
    writer.save_part(step, part="stage0", tensors=stage.state_dict(), optimizer=state, optimizer_meta=meta,
                     extra_json={"rng": rng_state_json(), "lr_scheduler": scheduler.state_dict()})
    # barrier, then on one rank:
    writer.commit(step, parts=["stage0", "stage1"], partition=partition, tied=tied_groups(model),
                  manifest_extra={"data": {"step": step}})

and to resume in any layout::

    ckpt = load_checkpoint(root)
    stage.load_state_dict(ckpt.tensors(stage.state_dict().keys()))
    names = list(stage.named_parameters())
    load_optimizer_state(optimizer, names, ckpt.optimizer_state([n for n, _ in names]),
                         ckpt.optimizer_meta([n for n, _ in names]))
"""

from .._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "add_checkpoint_parser": "._cli",
    "Checkpoint": "._load",
    "CheckpointError": "._format",
    "CheckpointWriter": "._save",
    "cmd_checkpoint_export": "._cli",
    "cmd_checkpoint_info": "._cli",
    "export_pretrained": "._export",
    "export_state_dict": "._export",
    "export_tensors": "._export",
    "format_info": "._export",
    "latest_checkpoint": "._format",
    "list_checkpoints": "._format",
    "load_checkpoint": "._load",
    "load_optimizer_state": "._state",
    "optimizer_state_by_fqn": "._state",
    "restore_rng_state": "._state",
    "rng_state_json": "._state",
    "tied_groups": "._state",
    "Verify": "._load",
})
