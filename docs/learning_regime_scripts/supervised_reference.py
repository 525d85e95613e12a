"""Supervised reference: same backbone, same global-crop augmentation, same steps; k-NN + train-acc.

The model and crops come from the ``demo`` recipe (``--recipe``), the data from the program's
synthetic defaults (``--difficulty``); built with the library's blocks (`cmd.training`).
"""
import json, time, argparse
from types import SimpleNamespace
import torch, torch.nn as nn
import cmd
from cmd.training import build_data
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=120)
p.add_argument("--slr", type=float, default=1e-3)
p.add_argument("--recipe", default="demo")
p.add_argument("--difficulty", default="demo")
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
args = SimpleNamespace(**vars(cmd.recipes.get(a.recipe)), dataset="synthetic", data_path=None, seed=a.seed,
                       synthetic_classes=10, synthetic_per_class=100, synthetic_image_size=32,
                       synthetic_difficulty=a.difficulty, knn_k=20)


@torch.no_grad()
def knn_top1(backbone, args, device, k):
    """k-NN top-1 (%) of the backbone's pooled features (train split as memory, test as queries)."""
    tf = cmd.eval_transform(args.global_size)
    feats = [cmd.extract_features(backbone, torch.utils.data.DataLoader(build_data(args, s, tf), batch_size=64),
                                  device=device, progress=False) for s in ("train", "test")]
    return float(cmd.KNNClassifier(k=(k,), temperature=0.07).fit(*feats[0]).evaluate(*feats[1])[k]["top1"])


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
