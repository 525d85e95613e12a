"""Probe (issue 23): is the k-NN fade of a finished run an artefact of the teacher's BatchNorm statistics?

The teacher's weights are an EMA of the student's, its BN buffers a copy of the student's. Prints the
k-NN top-1 of the run's teacher as saved, of its student, and of its teacher with the BN statistics
re-estimated on the train split (eval transform, cumulative average). Not part of the library::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python docs/learning_regime_scripts/bn_statistics_probe.py /tmp/seeds/base_s1
"""

import argparse
import json
import sys

import torch
from torch.utils.data import DataLoader

import cmd
from cmd.cli.pretrain import build_data, knn_top1

out = sys.argv[1]
args = argparse.Namespace(**json.load(open(f"{out}/args.json"))[-1]["args"])
args.no_progress, args.num_workers = True, 0
device = torch.device("cpu")
result = {key: knn_top1(cmd.load_pretrained(f"{out}/checkpoint.pth", key=key), args, device, args.knn_k)
          for key in ("teacher", "student")}
backbone = cmd.load_pretrained(f"{out}/checkpoint.pth", key="teacher")
for module in backbone.modules():
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over the pass
backbone.train()
with torch.no_grad():
    for images, _ in DataLoader(build_data(args, "train", cmd.eval_transform(args.global_size)), batch_size=64):
        backbone.forward_multicrop([images])
backbone.eval()
result["teacher_bn_recomputed"] = knn_top1(backbone, args, device, args.knn_k)
print(out, result)
