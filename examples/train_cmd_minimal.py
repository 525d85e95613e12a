"""CMD pretraining in one flat file (read this first): a recipe and the library's blocks in a plain loop.

The ``demo`` recipe (``cmd.recipes.get("demo")``: a narrow ResNet-18, 32 px crops, K = 128
prototypes, 10 epochs) holds every option of the method and the optimisation; the blocks of
``cmd.training`` build from it the data pipeline, network, loss, EMA teacher, optimiser and schedules
that ``cmd-fgvc pretrain`` itself trains with. Synthetic fine-grained data, the CPU, about 3
minutes. Left out (the command adds them): checkpoints and resume, torchrun, mixed precision,
logging, option parsing. A short CPU loop needs the ``demo`` recipe: the paper's (``"paper"``:
Swin-T, 224 px, K = 65536) is for GPUs and learns nothing in minutes.

    python examples/train_cmd_minimal.py             # 10 epochs; prints the teacher's k-NN before and after
    python examples/train_cmd_minimal.py --epochs 3  # a quicker look (the schedules shrink with it)
"""

import argparse
import dataclasses
import itertools

import torch
from torch.utils.data import DataLoader

import cmd
from cmd import training

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's, 10)")
parser.add_argument("--classes", type=int, default=10, help="synthetic classes")
parser.add_argument("--per_class", type=int, default=100, help="synthetic images per class and split")
parser.add_argument("--seed", type=int, default=0)
opts = parser.parse_args()

cfg = cmd.recipes.get("demo")  # a typed, checked config; dataclasses.replace overrides any option
if opts.epochs is not None:
    cfg = dataclasses.replace(cfg, epochs=opts.epochs)
torch.manual_seed(opts.seed)  # the initial weights


def images(split: str, transform=None) -> cmd.SyntheticFineGrained:
    """Synthetic fine-grained images: the classes differ only in a small part of the object."""
    return cmd.SyntheticFineGrained(n_classes=opts.classes, n_per_class=opts.per_class, image_size=32,
                                    split=split, seed=opts.seed, difficulty="demo", transform=transform)


# Data: 2 global and 4 local crops per image, seeded per (seed, epoch, image); batches are lists of
# 6 tensors [B, 3, H, W], globals first. loader.sampler.set_epochs picks the epochs of one pass.
loader = training.build_train_loader(cfg, images("train"), seed=opts.seed)
iters_per_epoch = len(loader)  # one epoch until set_epochs says otherwise
steps = cfg.epochs * iters_per_epoch

# The loss comes first: it says which outputs the networks must produce.
criterion = training.build_loss(cfg)  # image-, region- and inter-level terms (CMDLoss.from_preset)
student = training.build_network(cfg, outputs=criterion.student_outputs)  # backbone + CrossLevelHead
ema = training.build_teacher(cfg, student, total_steps=steps)  # EMA copy, no stochastic depth
teacher = ema.teacher
optimizer = training.build_optimizer(cfg, student)  # AdamW, no weight decay on biases and norms
lrs, wds = training.build_schedules(cfg, iters_per_epoch)  # per step: warm-up + cosine lr, weight decay


def knn_top1() -> float:
    """k-NN top-1 (%) of the teacher's backbone: train split as memory, test split as queries."""
    features = [
        cmd.extract_features(teacher.backbone, DataLoader(images(split, cmd.eval_transform(cfg.global_size)),
                                                          batch_size=64), progress=False)
        for split in ("train", "test")
    ]
    knn = cmd.KNNClassifier(k=(20,), temperature=0.07).fit(*features[0])
    return knn.evaluate(*features[1])[20]["top1"]


before = knn_top1()
print(f"teacher k-NN top-1 before training: {before:.1f} %")
loader.sampler.set_epochs(0, cfg.epochs)  # one pass over every epoch: workers never idle at epoch starts
batches = iter(loader)
step = 0
for epoch in range(cfg.epochs):
    for crops, _ in itertools.islice(batches, iters_per_epoch):
        cmd.set_schedules(optimizer, lr=float(lrs[step]), weight_decay=float(wds[step]))
        with torch.no_grad():
            teacher_out = teacher(crops[:2], outputs=criterion.teacher_outputs)  # the teacher sees the globals
        student_out = student(crops, outputs=criterion.student_outputs)  # the student sees every crop
        out = criterion(student_out, teacher_out, epoch)
        if not torch.isfinite(out.loss):
            raise SystemExit(f"non-finite loss at step {step}: stop before it reaches the teacher")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        cmd.clip_gradients(student, cfg.clip_grad)
        cmd.cancel_last_layer_gradients(student, epoch, cfg.freeze_last_layer)
        optimizer.step()
        ema.update(student)
        step += 1
    terms = "  ".join(f"{name} {float(out.terms[name]):.3f}" for name in criterion.active_terms)
    print(f"epoch {epoch + 1}/{cfg.epochs}  loss {out.loss.item():.3f}  {terms}", flush=True)
print(f"teacher k-NN top-1 before training: {before:.1f} %, after: {knn_top1():.1f} %")
