"""pretrain.main with (a) entropy tracing of the image-level teacher, (b) optional Sinkhorn-Knopp teacher (SK=1)."""
import json, math, os, sys
import torch
sys.path.insert(0, "examples")  # run from the repository root
import cmd.losses.dino as D
import cmd.losses.region as R
import cmd.losses.targets as T
try:  # the program moved into the package (cmd/cli/pretrain.py): patch it there
    import cmd.cli.pretrain as pretrain
except ImportError:
    import pretrain
import cmd.data.synthetic as SY
if os.environ.get("EASY_PF"):
    SY.DIFFICULTIES["easy"]["part_fraction"] = float(os.environ["EASY_PF"])
if os.environ.get("EASY_CS"):
    SY.DIFFICULTIES["easy"]["code_side"] = int(os.environ["EASY_CS"])

SK = os.environ.get("SK", "0") == "1"
trace = []


@torch.no_grad()
def sinkhorn(logits, temperature, n_iter=3):
    shape = logits.shape
    s = logits.detach().reshape(-1, shape[-1]).float() / temperature
    s = s - s.max()
    q = torch.exp(s).t()  # [K, B]
    q /= q.sum()
    K, B = q.shape
    for _ in range(n_iter):
        q /= q.sum(dim=1, keepdim=True); q /= K
        q /= q.sum(dim=0, keepdim=True); q /= B
    q *= B
    return q.t().reshape(shape)


def _stats(p):
    p2 = p.reshape(-1, p.shape[-1])
    h = -(p2 * p2.clamp_min(1e-12).log()).sum(-1).mean()
    m = p2.mean(0)
    hm = -(m * m.clamp_min(1e-12).log()).sum()
    trace.append((float(h), float(hm)))


def probs_img(logits, center, temperature):
    p = sinkhorn(logits, temperature) if SK else T.centered_probs(logits, center, temperature)
    _stats(p)
    return p


def logprobs_img(logits, center, temperature):
    p = probs_img(logits, center, temperature)
    return p, p.clamp_min(1e-30).log()


def probs_region(logits, center, temperature):
    return sinkhorn(logits, temperature) if SK else T.centered_probs(logits, center, temperature)


D.centered_probs, D.centered_log_probs, R.centered_probs = probs_img, logprobs_img, probs_region
KOLEO = float(os.environ.get("KOLEO", "0"))
if KOLEO:
    import dataclasses
    import cmd as _cmd
    _orig_forward = _cmd.CMDLoss.forward

    def _koleo(f):
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        d = torch.cdist(f, f)
        d = d + torch.eye(len(f), device=f.device) * 1e4
        return -torch.log(d.min(dim=1).values + 1e-8).mean()

    def _forward(self, student_out, teacher_out, epoch, **kw):
        out = _orig_forward(self, student_out, teacher_out, epoch, **kw)
        feats = student_out[0].features.mean(1)  # [2B, D]: token mean (= the CNN's pooled vector)
        k = sum(_koleo(c) for c in feats.chunk(2)) / 2
        extra = KOLEO * k
        try:
            return dataclasses.replace(out, loss=out.loss + extra)
        except TypeError:
            return out._replace(loss=out.loss + extra)

    _cmd.CMDLoss.forward = _forward
if os.environ.get("HEAD_BN") == "1":
    _orig_build = pretrain.build_network

    def _build(args, **kw):
        net = _orig_build(args, **kw)
        mlp = net.head.image_head.mlp
        for i in (0, 2):
            lin = mlp[i]
            mlp[i] = torch.nn.Sequential(lin, torch.nn.BatchNorm1d(lin.out_features))
        return net

    pretrain.build_network = _build
argv = sys.argv[1:]
res = pretrain.main(argv)
out = argv[argv.index("--output_dir") + 1]
n = 12
chunks = [trace[i:i + n] for i in range(0, len(trace), n)]
ent = [[round(sum(a for a, _ in c) / len(c), 3), round(sum(b for _, b in c) / len(c), 3)] for c in chunks]
json.dump({"entropy_per_12_steps [H(p), H(mean p)]": ent, "knn": res.get("knn")}, open(f"{out}/ent.json", "w"))
print("ENT", ent)
