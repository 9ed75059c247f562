"""nnU-Net v2 trainer with a wall-clock budget on one CPU thread, for the comparison in docs/headneck.md.

nnU-Net finds trainers by class name in the nnunetv2.training.nnUNetTrainer package, so this file is linked
there (see docs/headneck.md, "nnU-Net on the same CPU budget"):

    ln -s $PWD/docs/nnunet/nnUNetTrainerBudget.py \
        .venv-nnunet/lib/python3.11/site-packages/nnunetv2/training/nnUNetTrainer/variants/nnUNetTrainerBudget.py
    nnUNet_budget_minutes=100 nnUNetv2_train 501 3d_fullres all -tr nnUNetTrainerBudget -device cpu

What differs from the stock nnUNetTrainer, and why:
- one CPU thread (torch.set_num_threads(1); nnUNetv2_train -device cpu would take every core), the same as
  our model's `--threads 1`;
- training stops when nnUNet_budget_minutes (default 100) of wall time have passed since run_training began,
  checked before every iteration; the stock trainer stops only after num_epochs x 250 iterations (1000 x 250,
  weeks on one CPU core);
- the poly learning-rate schedule (lr0 x (1 - t)^0.9) runs over the fraction t of the wall-clock budget used
  instead of the fraction of epochs, so it anneals to about 0 at the end of the budget as the stock schedule
  does at the end of its 1000 epochs;
- epochs of 10 iterations and 1 validation iteration (the stock 250 and 50) so that the log, the pseudo-Dice
  and checkpoint_best come at a useful rate; with fold "all" nnU-Net's validation patches are training cases,
  so this pseudo-Dice says little and costs budget;
- checkpoint_latest after every epoch (so a stop keeps the last state), and a copy at nnUNet_snapshot_minutes
  (default 80, our shipped model's training time) as checkpoint_snapshot.pth;
- resumable across sessions: the wall time and iterations used so far are written beside checkpoint_latest
  (budget_state.json) after every epoch, and `nnUNetv2_train ... --c` continues the same budget from there
  (the time of an epoch cut off by a stop is not counted, as its work is not kept);
- no final validation (nnUNetv2_train predicts the fold's validation cases, which with fold "all" are the 167
  training cases): the 32 held-out cases are predicted with nnUNetv2_predict instead.
Everything else (plans, network, loss, augmentation, sampling, optimizer) is nnU-Net's own.
"""

import json
import os
import shutil
import time
from os.path import isfile, join

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _minutes_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"error: {name}={text!r} is not a number of minutes; set e.g. {name}={default}")
    if value <= 0:
        raise SystemExit(f"error: {name}={text!r} must be positive; set e.g. {name}={default}")
    return value


class nnUNetTrainerBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cpu")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        torch.set_num_threads(1)
        self.budget_seconds = 60.0 * _minutes_from_env("nnUNet_budget_minutes", 100)
        self.snapshot_seconds = 60.0 * _minutes_from_env("nnUNet_snapshot_minutes", 80)
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 100000  # an upper bound only: the wall clock ends training
        self.iterations_done = 0
        self._clock_start = None
        self._elapsed_before = 0.0  # wall time of earlier sessions, restored by load_checkpoint
        self._snapshot_written = False

    def _budget_state_path(self) -> str:
        return join(self.output_folder, "budget_state.json")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isfile(self._budget_state_path()):
            with open(self._budget_state_path()) as stream:
                state = json.load(stream)
            self._elapsed_before = float(state["elapsed_seconds"])
            self.iterations_done = int(state["iterations"])
            self._snapshot_written = bool(state["snapshot_written"])
            self.print_to_log_file(f"resumed the budget: {self._elapsed_before / 60:.1f} min and "
                                   f"{self.iterations_done} iterations used before")

    def _elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._clock_start

    def _out_of_time(self) -> bool:
        return self._elapsed() >= self.budget_seconds

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        fraction = min(self._elapsed() / self.budget_seconds, 1.0)
        lr = self.initial_lr * (1.0 - fraction) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.print_to_log_file(f"wall-clock poly learning rate {lr:.5f} at {fraction:.3f} of the budget")

    def on_epoch_end(self):
        super().on_epoch_end()  # increments current_epoch, may write checkpoint_best
        elapsed = self._elapsed()
        # on_epoch_end already counted this epoch; save_checkpoint stores current_epoch + 1, hence the -1
        self.current_epoch -= 1
        self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        self.current_epoch += 1
        with open(self._budget_state_path(), "w") as stream:
            json.dump({"elapsed_seconds": elapsed, "iterations": self.iterations_done,
                       "snapshot_written": self._snapshot_written or elapsed >= self.snapshot_seconds}, stream)
        if not self._snapshot_written and elapsed >= self.snapshot_seconds:
            shutil.copyfile(join(self.output_folder, "checkpoint_latest.pth"),
                            join(self.output_folder, "checkpoint_snapshot.pth"))
            self._snapshot_written = True
            self.print_to_log_file(f"snapshot after {elapsed / 60:.1f} min, {self.iterations_done} iterations: "
                                   f"checkpoint_snapshot.pth")
        rate = elapsed / max(self.iterations_done, 1)
        self.print_to_log_file(f"budget: {elapsed / 60:.1f} of {self.budget_seconds / 60:.0f} min, "
                               f"{self.iterations_done} iterations ({rate:.1f} s each), about "
                               f"{max(self.budget_seconds - elapsed, 0) / rate:.0f} iterations left")

    def run_training(self):
        self._clock_start = time.monotonic()
        self.on_train_start()
        while not self._out_of_time() and self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                if self._out_of_time():
                    break
                outputs.append(self.train_step(next(self.dataloader_train)))
                self.iterations_done += 1
            if not outputs:  # the budget ran out between epochs
                break
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.print_to_log_file(f"stopped by the wall clock after {self._elapsed() / 60:.1f} min: "
                               f"{self.current_epoch} epochs, {self.iterations_done} iterations of batch "
                               f"{self.batch_size}")
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped: fold 'all' would predict the training cases; "
                               "the held-out cases are predicted with nnUNetv2_predict")
