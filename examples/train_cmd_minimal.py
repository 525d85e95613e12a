"""CMD pretraining in one flat file: the blocks of `cmd` wired into a plain training loop.

Synthetic fine-grained data, a tiny ViT, the CPU, a few minutes. Everything the installed
``cmd-fgvc pretrain`` command adds (checkpoints and resume, torchrun, mixed precision, logging,
options) is left out, so that the wiring is all there is to read.

    python examples/train_cmd_minimal.py             # 10 epochs, prints the k-NN before and after
    python examples/train_cmd_minimal.py --epochs 1  # a quick look
"""

import argparse

import torch
from torch.utils.data import DataLoader

import cmd

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10, help="training epochs")
parser.add_argument("--classes", type=int, default=10, help="synthetic classes")
parser.add_argument("--per_class", type=int, default=40, help="synthetic images per class and split")
opts = parser.parse_args()
torch.manual_seed(0)

# Data: two 64 px global crops and four 32 px local crops of each image.
augment = cmd.MultiCropAugmentation(global_size=64, local_size=32, n_global=2, n_local=4)
train = cmd.SyntheticFineGrained(n_classes=opts.classes, n_per_class=opts.per_class, image_size=64,
                                 split="train", transform=augment)
loader = DataLoader(train, batch_size=32, shuffle=True, drop_last=True, collate_fn=cmd.multicrop_collate)

# The loss comes first: it says which outputs the networks must produce.
criterion = cmd.CMDLoss.from_preset("cmd", out_dim=1024, n_global_crops=2, n_local_crops=4,
                                    warmup_teacher_temp_epochs=opts.epochs)

# Student: a backbone and a cross-level head (image head, region head, gated-attention MIL pooling).
backbone = cmd.create_backbone("vit_tiny", depth=4, patch_size=8, embed_dim=96, num_heads=3)
head = cmd.CrossLevelHead(backbone.embed_dim, out_dim=1024, hidden_dim=256, bottleneck_dim=64,
                          pooling="gated_attention")
student = cmd.CMDNetwork(backbone, head)

# Teacher: an exponential moving average of the student, its momentum rising from 0.996 to 1.
steps = opts.epochs * len(loader)
ema = cmd.EMATeacher(student, momentum=0.996, final_momentum=1.0, total_steps=steps)
teacher = ema.teacher

# Optimiser and schedules (per step): lr with a warm-up, weight decay rising, DINO-style.
optimizer = torch.optim.AdamW(cmd.param_groups(student, weight_decay=0.04))
lrs = cmd.cosine_schedule(cmd.scale_lr(5e-4, 32), 1e-6, opts.epochs, len(loader), warmup_epochs=min(2, opts.epochs))
wds = cmd.cosine_schedule(0.04, 0.4, opts.epochs, len(loader))


def knn_top1() -> float:
    """k-NN top-1 (%) of the teacher's backbone: train split as memory, test split as queries."""
    features = []
    for split in ("train", "test"):
        data = cmd.SyntheticFineGrained(n_classes=opts.classes, n_per_class=opts.per_class, image_size=64,
                                        split=split, transform=cmd.eval_transform(64))
        features.append(cmd.extract_features(teacher.backbone, DataLoader(data, batch_size=64), progress=False))
    knn = cmd.KNNClassifier(k=(20,)).fit(*features[0])
    return knn.evaluate(*features[1])[20]["top1"]


print(f"teacher k-NN top-1 before training: {knn_top1():.1f} %")
step = 0
for epoch in range(opts.epochs):
    for crops, _ in loader:
        cmd.set_schedules(optimizer, lr=float(lrs[step]), weight_decay=float(wds[step]))
        with torch.no_grad():
            teacher_out = teacher(crops[:2], outputs=criterion.teacher_outputs)  # the teacher sees the globals
        student_out = student(crops, outputs=criterion.student_outputs)  # the student sees every crop
        out = criterion(student_out, teacher_out, epoch)
        if not torch.isfinite(out.loss):
            raise SystemExit(f"non-finite loss at step {step}: stop before it reaches the teacher")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        cmd.clip_gradients(student, 3.0)
        cmd.cancel_last_layer_gradients(student, epoch, freeze_last_layer=1)
        optimizer.step()
        ema.update(student)
        step += 1
    terms = "  ".join(f"{name} {float(out.terms[name]):.3f}" for name in criterion.active_terms)
    print(f"epoch {epoch + 1}/{opts.epochs}  loss {out.loss.item():.3f}  {terms}")
print(f"teacher k-NN top-1 after training: {knn_top1():.1f} %")
