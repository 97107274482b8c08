"""A fold in progress on disk, so a killed training job resumes where it stopped.

A checkpoint holds the trainer's state (model weights, optimizer variables,
augmentation random state) and the fold's own state (epochs done, history,
model selection, start time) with its arrays. It is written to a staging
folder and swapped in as a whole (`moaflow.files.replace_folder`), at most
every ``checkpoint_minutes``, and removed once the fold's outputs are complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from moaflow.files import replace_folder, restore_folder, write_json


class FoldCheckpoint:
    """Save and load one fold's state under ``directory``.

    Parameters
    ----------
    directory : path
        This fold's checkpoint folder.
    minutes : float
        Checkpoint when this long has passed since the last one (0: every epoch).
    """

    def __init__(self, directory, minutes: float):
        self.directory, self.minutes = Path(directory), minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= 60 * self.minutes

    def save(self, trainer_state: dict[str, list[np.ndarray]], state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Trainer state (name -> arrays), the fold's JSON-able state and its arrays, swapped in as a whole."""
        staging = self.directory.with_name(self.directory.name + ".next")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        np.savez(staging / "state.npz", **{f"{k}_{i}": v for k, values in trainer_state.items()
                                           for i, v in enumerate(values)},
                 **{f"extra_{k}": v for k, v in arrays.items()})
        write_json(state, staging / "state.json")
        replace_folder(staging, self.directory)
        self.last = time.monotonic()

    def load(self, template: dict[str, list]) -> tuple[dict[str, list[np.ndarray]], dict, dict] | None:
        """(trainer state shaped like ``template``, the fold's state, its arrays), or None without a checkpoint."""
        restore_folder(self.directory)
        if not (self.directory / "state.json").is_file():
            return None
        state = json.loads((self.directory / "state.json").read_text())
        with np.load(self.directory / "state.npz") as data:
            trainer_state = {k: [data[f"{k}_{i}"] for i in range(len(v))] for k, v in template.items()}
            arrays = {k[len("extra_"):]: data[k] for k in data.files if k.startswith("extra_")}
        return trainer_state, state, arrays
