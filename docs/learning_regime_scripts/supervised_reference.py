"""Supervised reference: same backbone, same global-crop augmentation, same steps; k-NN + train-acc."""
import json, sys, time, argparse
import torch, torch.nn as nn
import cmd
sys.path.insert(0, "examples")  # run from the repository root
try:
    from cmd.cli.pretrain import build_data, knn_top1, parse_args
except ImportError:
    from pretrain import build_data, knn_top1, parse_args
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=120)
p.add_argument("--slr", type=float, default=1e-3)
a, rest = p.parse_known_args()
args = parse_args(rest + ["--num_workers", "0", "--no_progress"])
torch.manual_seed(args.seed)
bb = cmd.create_backbone(args.arch, **args.backbone_kwargs)
head = nn.Linear(bb.embed_dim, args.synthetic_classes)
aug = cmd.MultiCropAugmentation(global_size=args.global_size, local_size=args.local_size, n_global=2, n_local=0,
                                global_scale=tuple(args.global_crops_scale))
data = build_data(args, "train", aug)
loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True,
                                     collate_fn=cmd.multicrop_collate)
opt = torch.optim.AdamW(list(bb.parameters()) + list(head.parameters()), lr=a.slr, weight_decay=0.04)
before = knn_top1(bb, args, "cpu", args.knn_k)
step, t0 = 0, time.time()
while step < a.steps:
    for crops, y in loader:
        lr = a.slr * min(1, (step + 1) / 10)
        for g in opt.param_groups: g["lr"] = lr
        x = torch.cat(crops[:1]); yy = y
        bb.train(); out = head(bb(x).pooled); loss = nn.functional.cross_entropy(out, yy)
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
        if step >= a.steps: break
after = knn_top1(bb, args, "cpu", args.knn_k)
print(json.dumps({"sup_knn_before": before, "sup_knn_after": after, "last_loss": float(loss), "steps": step, "time_s": time.time() - t0}))
