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

from ._cli import add_checkpoint_parser, cmd_checkpoint_export, cmd_checkpoint_info
from ._export import export_pretrained, export_state_dict, export_tensors, format_info
from ._format import CheckpointError, latest_checkpoint, list_checkpoints
from ._load import Checkpoint, Verify, load_checkpoint
from ._save import CheckpointWriter
from ._state import load_optimizer_state, optimizer_state_by_fqn, restore_rng_state, rng_state_json, tied_groups

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "Verify",
    "add_checkpoint_parser",
    "cmd_checkpoint_export",
    "cmd_checkpoint_info",
    "export_pretrained",
    "export_state_dict",
    "export_tensors",
    "format_info",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_state_by_fqn",
    "restore_rng_state",
    "rng_state_json",
    "tied_groups",
]
