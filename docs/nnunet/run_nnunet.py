"""Run nnUNetv2_train / nnUNetv2_predict with docs/nnunet/nnUNetTrainerBudget, unchanged otherwise.

    python docs/nnunet/run_nnunet.py train 501 3d_fullres all -tr nnUNetTrainerBudget -device cpu
    python docs/nnunet/run_nnunet.py predict -i IN -o OUT -d 501 -c 3d_fullres -f all -tr nnUNetTrainerBudget -device cpu

Why a launcher: nnU-Net looks a trainer up by importing every module of nnunetv2.training.nnUNetTrainer in
turn, and its Primus trainers import timm, which imports torchvision. The torchvision that pip pairs with
torch 2.13.0 (0.28.0) is a CUDA build whose extension cannot load next to the CPU torch we pin ("operator
torchvision::nms does not exist"), so the stock lookup crashes before it reaches any trainer. This launcher
hands nnU-Net our trainer class for its name (other names go to nnU-Net's lookup) and then runs nnU-Net's own
entry point with the remaining arguments.

NNUNET_TORCH_THREADS=N keeps torch at N threads: nnU-Net's -device cpu sets as many as there are cores.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nnUNetTrainerBudget import nnUNetTrainerBudget  # noqa: E402

import nnunetv2.inference.predict_from_raw_data as predict_module  # noqa: E402
import nnunetv2.run.run_training as train_module  # noqa: E402

_stock_lookup = train_module.recursive_find_trainer_class_by_name


def _lookup(name):
    return nnUNetTrainerBudget if name == nnUNetTrainerBudget.__name__ else _stock_lookup(name)


def main():
    commands = {"train": train_module.run_training_entry, "predict": predict_module.predict_entry_point}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: run_nnunet.py train|predict ARGS (the arguments of nnUNetv2_train / nnUNetv2_predict)")
    threads = os.environ.get("NNUNET_TORCH_THREADS")
    if threads is not None:
        if not threads.isdigit() or int(threads) < 1:
            sys.exit(f"error: NNUNET_TORCH_THREADS={threads!r} is not a positive whole number; set e.g. 1")
        torch.set_num_threads(int(threads))
        torch.set_num_threads = lambda _requested: None  # nnU-Net's entry points would raise it to every core
    train_module.recursive_find_trainer_class_by_name = _lookup
    predict_module.recursive_find_trainer_class_by_name = _lookup
    entry = commands[sys.argv[1]]
    sys.argv = [f"nnUNetv2_{sys.argv[1]}"] + sys.argv[2:]
    entry()


if __name__ == "__main__":
    main()
