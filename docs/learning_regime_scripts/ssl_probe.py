"""The plain-loop probe of docs/learning_regime.md (second round); e.g. H6: --difficulty demo --n_per_class 100."""
import argparse, json, math, time, sys
import torch, numpy as np
from torch.utils.data import DataLoader
import cmd

p = argparse.ArgumentParser()
A = p.add_argument
A("--difficulty", default="easy"); A("--part_fraction", type=float, default=None); A("--class_hue", type=float, default=None); A("--clutter", type=float, default=None)
A("--n_per_class", type=int, default=40); A("--classes", type=int, default=10); A("--size", type=int, default=32)
A("--gsize", type=int, default=32); A("--lsize", type=int, default=16); A("--nlocal", type=int, default=4)
A("--gscale", type=float, nargs=2, default=(0.4, 1.0)); A("--lscale", type=float, nargs=2, default=(0.05, 0.4))
A("--arch", default="resnet18"); A("--bk", type=json.loads, default=None)
A("--K", type=int, default=128); A("--hidden", type=int, default=256); A("--bottleneck", type=int, default=64)
A("--bn", type=int, default=1); A("--centering", default="center"); A("--tt", type=float, default=0.04); A("--st", type=float, default=0.1)
A("--lr", type=float, default=5e-4); A("--head_lr_mult", type=float, default=1.0); A("--warmup", type=int, default=20)
A("--mt", type=float, default=0.99); A("--steps", type=int, default=300); A("--eval_every", type=int, default=50)
A("--koleo", type=float, default=0.0); A("--batch", type=int, default=32); A("--wd", type=float, default=0.04)
A("--cm", type=float, default=0.9); A("--preset", default="dino"); A("--seed", type=int, default=0)
A("--teacher_train", type=int, default=1); A("--pooling", default="gated_attention"); A("--cos", type=int, default=1)
A("--norm_last", type=int, default=1); A("--tag", default="")
a = p.parse_args()
torch.manual_seed(a.seed)
kw = dict(n_classes=a.classes, image_size=a.size, difficulty=a.difficulty, part_fraction=a.part_fraction, class_hue=a.class_hue, clutter=a.clutter, seed=a.seed)
aug = cmd.MultiCropAugmentation(global_size=a.gsize, local_size=a.lsize, n_global=2, n_local=a.nlocal, global_scale=a.gscale, local_scale=a.lscale)
train = cmd.SyntheticFineGrained(n_per_class=a.n_per_class, split="train", transform=aug, **kw)
ev = cmd.eval_transform(a.gsize)
mem = cmd.SyntheticFineGrained(n_per_class=a.n_per_class, split="train", transform=ev, **kw)
test = cmd.SyntheticFineGrained(n_per_class=40, split="test", transform=ev, **kw)
bk = a.bk if a.bk is not None else ({"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 16} if a.arch == "resnet18" else {"depth": 4, "patch_size": 8, "embed_dim": 96, "num_heads": 3})
crit = cmd.CMDLoss.from_preset(a.preset, out_dim=a.K, n_global_crops=2, n_local_crops=a.nlocal, warmup_teacher_temp=a.tt, teacher_temp=a.tt,
                               warmup_teacher_temp_epochs=1, student_temp=a.st, center_momentum=a.cm, centering=a.centering, koleo_weight=a.koleo)
backbone = cmd.create_backbone(a.arch, pretrained=False, **bk)
mil = "mil_weights" in crit.student_outputs
head = cmd.CrossLevelHead(backbone.embed_dim, out_dim=a.K, hidden_dim=a.hidden, bottleneck_dim=a.bottleneck, use_bn=bool(a.bn),
                          pooling=a.pooling if mil else None, region_head=a.preset != "dino", norm_last_layer=bool(a.norm_last))
student = cmd.CMDNetwork(backbone, head)
ema = cmd.EMATeacher(student, momentum=a.mt, final_momentum=1.0 if a.cos else a.mt, total_steps=max(1, a.steps), check_finite=False)
teacher = ema.teacher
groups = cmd.param_groups(student, weight_decay=a.wd)
opt = torch.optim.AdamW(groups)
loader = DataLoader(train, batch_size=a.batch, shuffle=True, drop_last=True, collate_fn=cmd.multicrop_collate, num_workers=0)

@torch.no_grad()
def knn():
    bb = teacher.backbone; was = bb.training; bb.eval()
    f = lambda d: cmd.extract_features(bb, DataLoader(d, batch_size=100), progress=False)
    (xf, xy), (tf, ty) = f(mem), f(test)
    c = cmd.KNNClassifier(k=(20,), temperature=0.07, backend="torch"); c.fit(xf, xy)
    r = float(c.evaluate(tf, ty)[20]["top1"]); bb.train(was); return r

hist = {"before": knn()}
print(a.tag, "before", hist["before"], flush=True)
step, t0 = 0, time.time()
student.train(); teacher.train(bool(a.teacher_train))
sums = {}
while step < a.steps:
    for crops, _ in loader:
        if step >= a.steps: break
        lr = a.lr * min(1.0, (step + 1) / max(1, a.warmup))
        if a.cos and step >= a.warmup:
            lr = 1e-6 + 0.5 * (a.lr - 1e-6) * (1 + math.cos(math.pi * (step - a.warmup) / max(1, a.steps - a.warmup)))
        for g in opt.param_groups: g["lr"] = lr
        with torch.no_grad():
            tout = teacher(crops[:2], outputs=crit.teacher_outputs)
        sout = student(crops, outputs=crit.student_outputs)
        out = crit(sout, tout, teacher_temp=a.tt)
        opt.zero_grad(set_to_none=True); out.loss.backward()
        cmd.clip_gradients(student, 3.0); opt.step(); ema.update(student); step += 1
        for k in ("teacher_entropy", "teacher_batch_entropy", "teacher_student_kl"):
            sums[k] = sums.get(k, 0.0) + float(out.terms[k])
        sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach())
        if step % 25 == 0:
            print(a.tag, step, {k: round(v / 25, 3) for k, v in sums.items()}, f"{(time.time()-t0)/step:.2f}s/step", flush=True); sums = {}
        if step % a.eval_every == 0:
            hist[step] = knn(); print(a.tag, "knn", step, hist[step], flush=True)
print(a.tag, "RESULT", json.dumps(hist), "logK", round(math.log(a.K), 3), f"{time.time()-t0:.0f}s", flush=True)
