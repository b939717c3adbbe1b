"""What a training checkpoint holds, and how it travels between the processes and the disk.

    state = RunState(acc, recipe, run_dir, model, optimizer, tokenizer)
    state.save(run_dir.checkpoint(step), {"step": step, "tokens_seen": n})   # counters None: final/
    found = state.restore(say)        # (checkpoint name, counters) of the newest intact checkpoint, or None

A checkpoint is the adapter in PEFT's layout (method full: a whole safetensors model and its tokenizer),
the resolved recipe, and with counters the optimizer state keyed by parameter name plus state.json.
Saving, every process hands in its share (gather.py) and the main process writes the directory
atomically with its manifest (rundir.py); restoring, the main process reads the newest intact checkpoint
and every process takes its share. So the files are the same under every strategy and number of
processes, and a run resumes under another. Both calls are collective: every process makes them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dora_cli.errors import UserError
from dora_cli.recipe import Recipe, dump_recipe
from dora_cli.rundir import RunDir, newest_intact


class RunState:
    def __init__(self, acc, recipe: Recipe, run_dir: RunDir, model, optimizer, tokenizer):
        self.acc, self.recipe, self.dir = acc, recipe, run_dir
        self.model, self.optimizer, self.tokenizer = model, optimizer, tokenizer

    @property
    def _full(self) -> bool:
        return self.recipe.adapter.method == "full"

    def _unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds, as live (maybe sharded) tensors: the adapter under PEFT keys, or the
        whole model (method full)."""
        from dora_cli.adapters import adapter_tensors
        from dora_cli.gather import model_tensors

        return model_tensors(self._unwrapped()) if self._full else adapter_tensors(self._unwrapped())

    # ---- save --------------------------------------------------------------------------------------------
    def save(self, target: Path, counters: dict | None) -> Path:
        """Write checkpoint `target`; with `counters` (step, tokens_seen) also the optimizer state."""
        from dora_cli.gather import gather_all, optimizer_state

        snapshot = {"model": gather_all(self._live_tensors())}
        if counters is not None:
            snapshot["optimizer"] = optimizer_state(self._unwrapped(), self.optimizer)
        if self.acc.is_main_process:
            self.dir.write_checkpoint(target, lambda tmp: self._fill(tmp, snapshot, counters))
        self.acc.wait_for_everyone()
        return target

    def _fill(self, directory: Path, snapshot: dict, counters: dict | None) -> None:
        from dora_cli.adapters import save_adapter

        model = self._unwrapped()
        if self._full:
            model.save_pretrained(directory, state_dict=snapshot["model"], safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        else:
            save_adapter(model, self.recipe.adapter, directory, base_model=self.recipe.model.name_or_path, state=snapshot["model"])
        self.dir.write_recipe(dump_recipe(self.recipe), directory)
        if counters is not None:
            self.dir.write_state(directory, snapshot["optimizer"], counters)

    # ---- restore -----------------------------------------------------------------------------------------
    def restore(self, say) -> tuple[str, dict] | None:
        """Load the newest intact checkpoint into every process's share of the model and optimizer;
        (its name, its counters), or None when there is none."""
        from accelerate.utils import broadcast_object_list

        from dora_cli.gather import by_name, load_optimizer_state

        found = None
        if self.acc.is_main_process:
            try:
                found = self._read(say)
            except UserError as err:  # the others learn it too, instead of waiting for the checkpoint
                found = err
        if self.acc.num_processes > 1:
            found = broadcast_object_list([found], from_process=0)[0]
        if isinstance(found, UserError):
            raise found
        if found is None:
            return None
        name, tensors, optimizer_state, counters = found
        where = self.dir.path / name
        self._put_model(tensors, where)
        model = self._unwrapped()
        load_optimizer_state(model, self.optimizer, by_name(optimizer_state, model), where)
        return name, counters

    def _read(self, say) -> tuple | None:
        """(name, model tensors, optimizer state, counters) of the newest intact checkpoint, or None."""
        from safetensors.torch import load_file

        from dora_cli.adapters import read_adapter_weights

        found = newest_intact(self.dir.path, say=say)
        if found is None:
            return None
        _, path = found
        if self._full:
            tensors = {}
            for shard in sorted(path.glob("model*.safetensors")):
                tensors.update(load_file(str(shard)))
        else:
            tensors = read_adapter_weights(path)
        return (path.name, tensors, *self.dir.read_state(path))

    def _put_model(self, tensors: dict, where: Path) -> None:
        """Load checkpoint tensors into this process's share of the model (after checking they fit)."""
        from dora_cli.adapters import fit_adapter_state
        from dora_cli.gather import global_shape, put

        live = self._live_tensors()
        if self._full:
            missing = sorted(set(live) - set(tensors))
            if missing:
                raise UserError(f"{where}: {missing[0]} is missing from the checkpoint ({len(missing)} missing)")
            pairs = [(tensor, tensors[key]) for key, tensor in live.items()]
        else:
            pairs = fit_adapter_state(self._unwrapped(), tensors, where, shape=global_shape).values()
        for tensor, value in pairs:
            put(tensor, value)
