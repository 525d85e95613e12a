"""Self-supervised CMD pretraining, built only from the public blocks of `cmd`.

Every method, optimisation and crop option comes from a recipe (`cmd.recipes`; ``cmd-fgvc recipes``
lists them): run with no arguments for the ``demo`` recipe, a CPU demonstration (synthetic
fine-grained data, a narrow ResNet-18 on 32 px crops, a few minutes on 2 cores) that prints the
teacher's k-NN top-1 before and after training. On a real dataset the default is the ``paper``
recipe (the official fine-grained runs' settings: Swin-T W14, 2 x 224 + 8 x 96 crops, K = 65536)::

    torchrun --nproc_per_node 8 -m cmd pretrain --recipe paper --dataset cub \\
        --data_path /data/CUB_200_2011 --output_dir out/cub_cmd --init esvit_swin_tiny_w14.pth

``--config FILE`` overrides the recipe and flags override both; ``--print_config`` shows the
resolved options with their sources. The first line of the output names the recipe.

What one step does (the data flow of the library)::

    images -> MultiCropAugmentation -> crops [G global, L local]
    student = CMDNetwork(backbone, CrossLevelHead) on all crops, teacher (EMA copy) on the G globals
    CMDLoss(student outputs, teacher outputs) -> loss; backward; clip; AdamW step; EMA update

The run resumes automatically from ``output_dir/checkpoint.pth``; a resumed run continues exactly
(augmentations are seeded per (seed, epoch, image), the data order per (seed, epoch)), with every
schedule recomputed from the current options (a larger ``--epochs`` extends a finished run).
``log.jsonl`` (one row per completed epoch) is written only after the checkpoint that holds its
epoch; per-step scalars go to ``steps.csv`` / TensorBoard (``--logger``); ``args.json`` lists every
start. The bookkeeping lives in `cmd.cli.run_state`, `cmd.cli.loggers` and `cmd.cli.output_lock`;
the data pipeline, network, loss, teacher, optimiser and schedules are built by `cmd.training` (a
custom loop built from the same options trains identically). One data-loader pass spans all the
remaining epochs, so its workers prefetch the next epoch's first batches while an epoch ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

import cmd
from cmd import distributed as dist
from cmd import training
from cmd.checkpoint import CheckpointError, read_checkpoint
from cmd.cli.collapse import COLLAPSE_EXIT_STATUS, CollapseStop, CollapseWatch
from cmd.cli.common import build_data as _build_data
from cmd.cli.common import cli_message, run_command
from cmd.cli.data_guard import DataLoadError, GuardedBatches
from cmd.cli.data_identity import data_identity
from cmd.cli.exit_status import pretrain_status
from cmd.cli.loggers import StepLoggers, build_step_loggers, show_progress
from cmd.cli.options import build_pretrain_parser, parse_pretrain_args
from cmd.cli.output_lock import OutputLock, OutputLockedError
from cmd.cli.run_state import (
    EpochStats,
    FiniteGuard,
    NonFiniteLossError,
    append_args_history,
    check_model_options,
    format_epoch_line,
    ignore_termination_signals,
    resume_plan,
    write_json_atomic,
    write_jsonl_atomic,
)
from cmd.cli.teardown import close_loader, install_exit_hook, kill_loader_workers
from cmd.diagnostics import EmbeddingReservoir
from cmd.training import EpochIndexSampler, SeededMultiCrop  # noqa: F401  (importable from here)

# --------------------------------------------------------------------------------------- options
# The parser and the --config mechanism live in cmd/cli/options.py (shared with `cmd-fgvc evaluate`).
build_parser = build_pretrain_parser
parse_args = parse_pretrain_args


# ------------------------------------------------------------------------------------------ data
# SeededMultiCrop and EpochIndexSampler live in the library (cmd.training.data); imported above and
# kept importable from here.


def build_data(args, split: str, transform, **synthetic):
    """The ``split`` of ``--dataset``; a missing test split says to pass --no_knn (see `cmd.cli.common`)."""
    return _build_data(args, split, transform, command="pretrain", **synthetic)


# -------------------------------------------------------------------------------------- network


def build_network(
    args: argparse.Namespace, *, verbose: bool = False, outputs: frozenset[str] | None = None
) -> cmd.CMDNetwork:
    """`cmd.training.build_network` with ``--init`` errors as one line naming the flags.

    ``outputs`` (the loss's ``student_outputs``): build only the head parts the loss consumes, so
    that every parameter gets a gradient (DDP without find_unused_parameters).
    """
    try:
        network = training.build_network(args, outputs=outputs)
    except ValueError as err:
        if not args.init:
            raise
        hint = "" if args.init_partial else " (--init_partial starts from the part that fits)"
        raise SystemExit(f"--init {args.init}: {cli_message(err)}{hint}") from err
    report = network.backbone.load_report
    if report is not None and verbose:
        print(f"initialised from {args.init} [{args.init_key}]: {report.summary()}")
    return network


# ----------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def knn_top1(backbone: nn.Module, args, device, k: int) -> float:
    """k-NN top-1 (%) of a backbone's pooled features: train split as memory, test split as queries."""
    transform = cmd.eval_transform(args.eval_size or args.global_size)
    loaders = []
    for split in ("train", "test"):
        data = build_data(args, split, transform)
        sampler = DistributedSampler(data, shuffle=False) if dist.is_dist() else None
        loaders.append(DataLoader(data, batch_size=64, sampler=sampler, num_workers=args.num_workers,
                                  worker_init_fn=ignore_termination_signals if args.num_workers else None))
    progress = not args.no_progress
    train_f, train_y = cmd.extract_features(backbone, loaders[0], device=device, progress=progress,
                                            desc="k-NN: features of the train split")
    test_f, test_y = cmd.extract_features(backbone, loaders[1], device=device, progress=progress,
                                          desc="k-NN: features of the test split")
    knn = cmd.KNNClassifier(k=(k,), temperature=0.07, backend="torch")
    knn.fit(train_f, train_y)
    metrics = knn.evaluate(test_f, test_y)
    return float(metrics[k]["top1"])  # a k above the training-set size is clamped (with a warning)


# ------------------------------------------------------------------------------------- training

RANKME_ROWS = 2048  # rows of the teacher's image vectors sampled per epoch for log.jsonl's "rankme"
# scalars summed over each epoch (log.jsonl) and logged per step (--logger); NaN ones are left out
_EXTRA_TERMS = ("inter_level_teacher", "teacher_entropy", "teacher_batch_entropy", "teacher_region_entropy",
                "teacher_student_kl")


def _check_data(args: argparse.Namespace) -> Dataset:
    """The training set (and, with the k-NN monitor, the test split): fails before anything is written."""
    try:
        train = build_data(args, "train", None)
        if not args.no_knn:
            build_data(args, "test", None)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        raise SystemExit(f"error: --dataset {args.dataset} --data_path {args.data_path}: {err}") from err
    return train


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.no_progress = not show_progress(args.no_progress)  # no bars into a redirected log (CMD_FGVC_PROGRESS=1 forces)
    install_exit_hook()  # data-loading workers ignore SIGTERM: killed at exit, never waited for
    dist.init_distributed_from_env()
    if args.supervised_reference and dist.is_dist():
        raise SystemExit("error: --supervised_reference runs in one process; run it without torchrun")
    rank, world = dist.rank(), dist.world_size()
    if rank == 0:
        print(f"recipe: {args.recipe} ({args.recipe_source})")
        if args.recipe.startswith("released") and world != 2:
            print(f"note: the released recipe is the official 2 processes x {args.batch_size_per_gpu} images; this run "
                  f"has {world} process(es) (the lr scales with the total batch): torchrun --nproc_per_node 2")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and dist.is_dist():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(args.seed)  # the same initial weights on every process
    out_dir = Path(args.output_dir)
    progress = not args.no_progress and rank == 0

    # ---- data (checked before anything is written: a failed start leaves the output folder alone).
    # One loader pass spans all the remaining epochs (workers prefetch across the epoch boundaries).
    try:
        loader = training.build_train_loader(
            args, _check_data(args), seed=args.seed, rank=rank, world_size=world, num_workers=args.num_workers,
            pin_memory=device.type == "cuda", worker_init_fn=ignore_termination_signals,
        )
    except ValueError as err:  # smaller than one batch
        raise SystemExit(f"{err}: lower --batch_size_per_gpu") from err
    train_set, epoch_sampler = loader.dataset, loader.sampler
    iters_per_epoch = epoch_sampler.epoch_length // args.batch_size_per_gpu
    total_steps = args.epochs * iters_per_epoch

    # ---- loss (first: it says which outputs the networks must give)
    criterion = training.build_loss(args).to(device)
    # ---- networks. The teacher's update is not checked on the host each step: FiniteGuard skips a
    # non-finite step on the device, so the student (and with it the teacher) stays finite.
    student = build_network(args, verbose=rank == 0, outputs=criterion.student_outputs).to(device)
    if args.head_bn and dist.is_dist():  # batch statistics over the global batch (before the teacher copies it)
        if device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        elif rank == 0:  # torch's SyncBatchNorm runs on GPUs only
            print("note: --head_bn on the CPU under torch.distributed: BatchNorm statistics per process")
    ema = training.build_teacher(args, student, total_steps, check_finite=False)
    teacher = ema.teacher
    student_ddp: nn.Module = student
    if dist.is_dist():
        student_ddp = nn.parallel.DistributedDataParallel(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
        )
    torch.manual_seed(args.seed + rank)  # per-process randomness from here on
    student_fwd, teacher_fwd = student_ddp, teacher
    if args.compile:
        student_fwd, teacher_fwd = torch.compile(student_ddp), torch.compile(teacher)

    # ---- optimiser, schedules (always from the current options, also on resume)
    optimizer = training.build_optimizer(args, student)  # fused AdamW where torch has it
    lr_schedule, wd_schedule = training.build_schedules(args, iters_per_epoch, world)
    precision = cmd.mixed_precision(device, args.amp)
    # skip a non-finite step on the device (fused AdamW reads found_inf); fp16's GradScaler skips on its own
    skip_on_device = bool(optimizer.defaults.get("fused")) and not precision.scaler.is_enabled()

    # ---- the output folder: locked, then the checkpoint read (resume) and this run recorded
    lock = OutputLock(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except OutputLockedError as err:
            raise SystemExit(f"error: {err}") from None
    try:
        return _train(**locals())
    finally:
        lock.release()


def _train(args, rank, world, device, out_dir, progress, train_set, epoch_sampler, loader, iters_per_epoch,
           total_steps, criterion, student, ema, teacher, student_fwd, teacher_fwd, optimizer, lr_schedule,
           wd_schedule, precision, skip_on_device, **_unused) -> dict:
    """The resume, the epochs and the final evaluation of `main` (which holds the output folder's lock)."""
    start_epoch, epoch_step, step = 0, 0, 0
    ckpt_path = out_dir / "checkpoint.pth"
    log_path = out_dir / "log.jsonl"
    current = {**_jsonable(vars(args)), "world_size": world}
    identity = data_identity(args, getattr(train_set, "dataset", train_set))  # checked on resume
    history: dict = {}
    resumed_at = None
    if ckpt_path.exists():
        try:
            meta = cmd.restore_checkpoint(
                ckpt_path, student=student, teacher=teacher, optimizer=optimizer, loss=criterion,
                scaler=precision.scaler, ema=ema,
            )
        except CheckpointError:  # name the model options that changed, when they are the reason
            check_model_options(read_checkpoint(ckpt_path).get("args") or {}, current, ckpt_path)
            raise
        plan = resume_plan(meta, current, iters_per_epoch, ckpt_path, data=identity)
        start_epoch, epoch_step, step = plan.epoch, plan.epoch_step, plan.step
        history = meta.get("history", {}) or {}
        if "epochs" not in history and log_path.exists():  # a checkpoint of an older version
            rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            history["epochs"] = [r for r in rows if isinstance(r.get("epoch"), int) and r["epoch"] <= start_epoch]
        # every schedule follows the current options (an extended run gets its teacher momentum back)
        ema.momentum, ema.final_momentum, ema.total_steps, ema.step = args.momentum_teacher, 1.0, total_steps, step
        resumed_at = {"epoch": start_epoch, "step": step}
        if rank == 0:
            where = f"epoch {start_epoch}" + (f" + {epoch_step} steps" if epoch_step else "")
            print(f"resumed from {ckpt_path} at {where} (step {step})")
            for note in plan.notes:
                print(note)
    history.setdefault("epochs", [])
    knn_history = history.setdefault("knn", {})
    if rank == 0:
        append_args_history(out_dir / "args.json", current, resumed_at=resumed_at)
        if history["epochs"] or log_path.exists():
            write_jsonl_atomic(log_path, history["epochs"])  # drop rows no checkpoint holds

    if start_epoch >= args.epochs and not epoch_step:
        if rank == 0:
            print(f"{ckpt_path} has already trained {start_epoch} epochs (--epochs {args.epochs}): nothing to train")
        summary = history["epochs"][-1] if history["epochs"] else {}
        return {"interrupted": False, "step": step, "knn": dict(knn_history), **summary}

    if not args.no_knn and "before" not in knn_history:
        knn_history["before"] = knn_top1(teacher.backbone, args, device, args.knn_k)
        if rank == 0:
            print(f"teacher k-NN top-1 before training: {knn_history['before']:.2f} %")
    step_log = (build_step_loggers(args.logger, out_dir, resume_step=step, config=_jsonable(vars(args))) if rank == 0
                else StepLoggers([]))

    # ---- signals: save and exit at the end of the current step
    stop = {"signal": None}

    def _on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def save(path: Path, **position) -> None:
        if rank != 0:
            return
        cmd.save_checkpoint(
            path, student=student.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
            loss=criterion.state_dict(), scaler=precision.scaler.state_dict() if precision.scaler else None,
            ema=ema.state_dict(), args=_jsonable(vars(args)), history=history,
            backbone_numerics=student.backbone.numerics, iters_per_epoch=iters_per_epoch, world_size=world,
            data_identity=identity, **position,
        )

    steps_this_run = 0

    def should_stop() -> bool:
        """A signal arrived, or this run has done its --max_steps."""
        return stop["signal"] is not None or bool(args.max_steps and steps_this_run >= args.max_steps)

    active = list(criterion.active_terms)
    names = ["loss", *active, *_EXTRA_TERMS]
    guarded = len(active) + 1  # the loss and the active terms must be finite (the others are NaN when unused)
    guard = FiniteGuard(names[:guarded], device, checkpoint=ckpt_path)
    watch = CollapseWatch(criterion.out_dim, stop=args.stop_on_collapse, verbose=rank == 0,
                          reduce_mean=(lambda *v: _mean_over_processes(*v, device=device)) if dist.is_dist() else None)
    # RankMe of the teacher's image vectors of the epoch's global crops (a uniform sample of them)
    reservoir = EmbeddingReservoir(RANKME_ROWS, seed=args.seed)
    teacher_outputs = criterion.teacher_outputs | {"pooled"}
    summary: dict = {}
    # one loader pass over every remaining epoch, split by epoch below: the workers prefetch the next
    # epoch's first batches while this one ends (the order and crops are those of one pass per epoch)
    epoch_sampler.set_epochs(start_epoch, args.epochs, skip=epoch_step * args.batch_size_per_gpu)
    batches = iter(loader)
    try:
        for epoch in range(start_epoch, args.epochs):
            student.train()
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats = EpochStats(names, device)
            watch.new_epoch()
            reservoir.reset(seed=args.seed * 1_000_003 + epoch)
            if epoch_step:
                stats.load_state_dict(history.get("partial"))
            t_log, step_logged = time.perf_counter(), step
            bar = tqdm(itertools.islice(batches, iters_per_epoch - epoch_step), total=iters_per_epoch - epoch_step,
                       desc=f"epoch {epoch + 1}/{args.epochs}", disable=not progress, leave=False)
            loading = GuardedBatches(bar)  # a loading error ends the loop: the steps done are saved below
            for crops, _labels in loading:
                cmd.set_schedules(optimizer, lr=float(lr_schedule[step]), weight_decay=float(wd_schedule[step]))
                crops = [c.to(device, non_blocking=True) for c in crops]
                with precision.autocast():
                    with torch.no_grad():
                        teacher_out = teacher_fwd(crops[:2], outputs=teacher_outputs)
                    student_out = student_fwd(crops, outputs=criterion.student_outputs)
                    out = criterion(student_out, teacher_out, epoch)
                optimizer.zero_grad(set_to_none=True)
                precision.backward(out.loss)
                precision.unscale_(optimizer)
                norms = cmd.clip_gradients(student, args.clip_grad if args.clip_grad > 0 else float("inf"))
                cmd.cancel_last_layer_gradients(student, epoch, args.freeze_last_layer)
                values = stats.add({"loss": out.loss.detach(), **out.terms})
                if teacher_out[0].pooled is not None:  # the image head's input vector [G * B, D]
                    reservoir.add(teacher_out[0].pooled)
                step += 1
                # under fp16 overflowing gradients are expected (GradScaler skips those steps): loss and terms only
                found_inf = guard.check_step(step, values[:guarded], None if precision.scaler.is_enabled() else norms)
                if skip_on_device:
                    optimizer.found_inf = found_inf
                elif not precision.scaler.is_enabled() and bool(found_inf):  # non-fused optimiser: a host sync
                    optimizer.zero_grad(set_to_none=True)
                precision.step(optimizer)
                if skip_on_device:
                    del optimizer.found_inf
                momentum = ema.update(student)
                steps_this_run += 1
                epoch_step += 1
                if step % args.log_every == 0 or epoch_step == iters_per_epoch:
                    guard.raise_if_bad()
                    now = time.perf_counter()
                    scalars = {n: v for n, v in zip(names, values.tolist()) if v == v}  # NaN: not computed
                    scalars.update(lr=float(lr_schedule[step - 1]), weight_decay=float(wd_schedule[step - 1]),
                                   teacher_momentum=momentum, teacher_temp=float(criterion.teacher_temperature(epoch)),
                                   images_per_s=(step - step_logged) * args.batch_size_per_gpu * world
                                   / max(now - t_log, 1e-9))
                    t_log, step_logged = now, step
                    step_log.log(step, scalars)
                    watch.check(scalars, step)
                    if progress:
                        bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                if should_stop() or watch.stop_requested:
                    break
            guard.raise_if_bad()  # never save a checkpoint after a non-finite step
            elapsed = time.perf_counter() - t0
            epoch_done = epoch_step == iters_per_epoch
            if watch.stop_requested:
                _stop_on_collapse(args, history, stats, watch, epoch, epoch_done, epoch_step, step, elapsed, world, device,
                                  lr_schedule, wd_schedule, ema, criterion, active, save, ckpt_path, log_path, rank)
            if loading.error is not None and (dist.is_dist() or not epoch_step):  # nothing to save, or cannot
                why = ("under torch.distributed the other processes cannot join a save" if dist.is_dist() else
                       f"no step of epoch {epoch + 1} was done")
                raise DataLoadError(f"{loading.error}; {why}: nothing saved"
                                    + (f" (the checkpoint {ckpt_path} is kept)" if ckpt_path.exists() else ""))
            if not epoch_done:  # interrupted: the epoch's sums so far go into the checkpoint
                history["partial"] = stats.state_dict(dist.all_reduce_sum, elapsed)
                save(ckpt_path, epoch=epoch, epoch_step=epoch_step, step=step)
                if loading.error is not None:  # an unreadable image: saved like a signal, then the error
                    raise DataLoadError(f"{loading.error}; the {epoch_step} steps done in epoch {epoch + 1} were "
                                        f"saved to {ckpt_path} (replace the file and rerun to resume)")
                if rank == 0:
                    why = f"signal {stop['signal']}" if stop["signal"] is not None else f"--max_steps {args.max_steps}"
                    print(f"stopped at step {step} ({why}); checkpoint saved to {ckpt_path}")
                return {"interrupted": True, "step": step, **summary}
            record = _epoch_record(args, stats, epoch, step, elapsed, world, device, lr_schedule, wd_schedule,
                                   ema, criterion, active)
            rank_me = reservoir.rankme()  # a collective under torch.distributed: every process
            if rank_me is not None:
                record["rankme"] = rank_me
            if watch.epoch_kind:
                record["collapse"] = watch.epoch_kind
            last = epoch + 1 == args.epochs
            if not args.no_knn and ((args.knn_every and (epoch + 1) % args.knn_every == 0) or last):
                record["knn_top1"] = knn_top1(teacher.backbone, args, device, args.knn_k)
                if last:
                    knn_history["after"] = record["knn_top1"]
            if "before" in knn_history and not history["epochs"]:
                record["knn_top1_before"] = knn_history["before"]
            history["epochs"].append(record)
            history.pop("partial", None)
            epoch_step = 0
            save(ckpt_path, epoch=epoch + 1, epoch_step=0, step=step)
            if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save(out_dir / f"checkpoint{epoch + 1:04d}.pth", epoch=epoch + 1, epoch_step=0, step=step)
            if rank == 0:  # the log follows the checkpoint: written only once the epoch is saved
                write_jsonl_atomic(log_path, history["epochs"])
                print(format_epoch_line(record, args.epochs, out_dim=args.out_dim))
                step_log.log_epoch(step, record)  # the k-NN where measured
                if last:
                    step_log.log_summary(_jsonable(vars(args)), {"knn_top1": record.get("knn_top1"), "loss": record["loss"]})
            summary = record
            if should_stop() and not last:
                if rank == 0:
                    why = f"signal {stop['signal']}" if stop["signal"] is not None else f"--max_steps {args.max_steps}"
                    print(f"stopped at step {step} ({why}); checkpoint saved to {ckpt_path}")
                return {"interrupted": True, "step": step, **summary}
    except BaseException:
        kill_loader_workers(batches)  # an error: the training loader's workers (which ignore SIGTERM) go at once
        raise
    finally:
        step_log.close()
        close_loader(batches)  # the workers shut down before the process group goes
        for s, h in old_handlers.items():
            signal.signal(s, h)

    if not args.no_knn and rank == 0:
        print(f"teacher k-NN top-1 before training: {knn_history.get('before', float('nan')):.2f} %, "
              f"after: {knn_history['after']:.2f} %")
    reference = None
    if args.supervised_reference:  # one process only (checked in main)
        reference = supervised_reference(args, device, total_steps, iters_per_epoch, knn_history)
        write_json_atomic(out_dir / "supervised_reference.json", reference)
    if rank == 0:
        print(f"checkpoint saved to {ckpt_path} (load it with cmd.load_pretrained)")
    if args.viz and rank == 0:
        saved = _save_visualisations(args, teacher, device, out_dir)
        step_log.log_images(step, {p.stem: p for p in saved if p.name in ("region_weights.png", "training_curves.png")})
    step_log.finish()
    return {"interrupted": False, "step": step, "knn": dict(knn_history), **summary, "collapses": dict(watch.seen),
            **({"supervised_reference": reference} if reference is not None else {})}


class _OneCrop:
    """One global crop of a `MultiCropAugmentation` (n_global=1, n_local=0) as a tensor [3, H, W]."""

    def __init__(self, augmentation: cmd.MultiCropAugmentation) -> None:
        self.augmentation = augmentation

    def __call__(self, image):
        return self.augmentation(image)[0]


def supervised_reference(args: argparse.Namespace, device: torch.device, steps: int, iters_per_epoch: int,
                         knn: dict) -> dict:
    """What labels reach with the same backbone, initial weights, steps and lr schedule (--supervised_reference).

    The backbone is built as the student's was (same seed, same ``--init``) and trained end to end
    with a linear classifier (`cmd.eval.train_supervised`) on one global crop per training image
    (the run's global-crop augmentation), for as many steps as the self-supervised run took; then
    the k-NN monitor runs on it. Prints and returns its k-NN top-1 with the fraction of the gap
    from random init to it that the self-supervised teacher closed.
    """
    torch.manual_seed(args.seed)  # the student's initial weights
    backbone = build_network(args).backbone.to(device)
    one_crop = _OneCrop(training.build_multicrop(args, n_global=1, n_local=0))
    data = build_data(args, "train", one_crop)
    num_classes = len(data.classes) if hasattr(data, "classes") else int(max(data.targets)) + 1
    loader = DataLoader(data, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed),
                        worker_init_fn=ignore_termination_signals if args.num_workers else None)
    result = cmd.eval.train_supervised(
        backbone, loader, num_classes, steps=steps, lr=cmd.scale_lr(args.lr, args.batch_size_per_gpu),
        min_lr=args.min_lr, weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup_epochs, args.epochs) * iters_per_epoch, device=device, seed=args.seed,
        progress=not args.no_progress,
    )
    top1 = knn_top1(backbone, args, device, args.knn_k)
    closed = cmd.eval.gap_closed(knn["before"], knn["after"], top1)
    print(f"supervised reference (the same backbone and initial weights, {result.steps} steps with labels, "
          f"{result.time_s:.0f} s): k-NN top-1 {top1:.2f} %; the self-supervised teacher closed "
          + (f"{100 * closed:.0f} %" if math.isfinite(closed) else "- (no gap)")
          + f" of the gap from random init ({knn['before']:.2f} -> {knn['after']:.2f} of {top1:.2f} %)")
    return {"knn_top1": top1, "knn_before": knn["before"], "knn_after": knn["after"],
            "gap_closed": closed if math.isfinite(closed) else None, "steps": result.steps,
            "train_top1": result.train_top1, "final_loss": result.final_loss, "time_s": result.time_s}


def _epoch_record(args, stats, epoch, step, elapsed, world, device, lr_schedule, wd_schedule, ema, criterion,
                  active) -> dict:
    """The epoch's row of log.jsonl: mean terms over the whole epoch, schedules at its last step, timings."""
    means = stats.means(dist.all_reduce_sum)
    elapsed += stats.saved_time
    return {
        "epoch": epoch + 1,
        "step": step,
        # terms a preset does not compute are NaN: left out of the log (strict JSON)
        **{k: v for k, v in means.items() if k in active or k == "loss" or math.isfinite(v)},
        "lr": float(lr_schedule[step - 1]),
        "weight_decay": float(wd_schedule[step - 1]),
        "teacher_momentum": float(ema.momentum_at(step - 1)),
        "teacher_temp": float(criterion.teacher_temperature(epoch)),
        "images_per_s": (stats.count + stats.saved_count) * args.batch_size_per_gpu * world / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    }


def _mean_over_processes(*values: float, device: torch.device) -> list[float]:
    """The mean of host scalars over the processes (one collective on ``device``: NCCL needs a GPU tensor)."""
    summed = dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device))
    return (summed / dist.world_size()).tolist()


def _stop_on_collapse(args, history, stats, watch, epoch, done, epoch_step, step, elapsed, world, device, lr_schedule,
                      wd_schedule, ema, criterion, active, save, ckpt_path, log_path, rank) -> None:
    """``--stop_on_collapse``: save the checkpoint where training stands, log the epoch so far, raise `CollapseStop`.

    The epoch's row in log.jsonl holds the means over the steps done (``"stopped_at_step"``) and
    ``"collapse"``; a resumed run recomputes that epoch's row (the checkpoint holds its partial sums).
    """
    kind, at = watch.last
    record = _epoch_record(args, stats, epoch, step, elapsed, world, device, lr_schedule, wd_schedule, ema,
                           criterion, active)
    record.update(collapse=kind, stopped_at_step=step)
    if not done:
        history["partial"] = stats.state_dict(dist.all_reduce_sum, elapsed)
        save(ckpt_path, epoch=epoch, epoch_step=epoch_step, step=step)
        rows = [*history["epochs"], record]
    else:
        history["epochs"].append(record)
        history.pop("partial", None)
        save(ckpt_path, epoch=epoch + 1, epoch_step=0, step=step)
        rows = history["epochs"]
    if rank == 0:
        write_jsonl_atomic(log_path, rows)
    raise CollapseStop(f"the teacher collapsed ({kind.replace('_', '-')}, diagnosed at step {at}) and "
                       f"--stop_on_collapse is set: stopped at step {step}, checkpoint saved to {ckpt_path}")


def _jsonable(values: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}


_MAX_HEATMAP_CLASSES = 20  # region_weights.png: one image per class up to this many classes


def _save_visualisations(args, teacher, device, out_dir: Path) -> list[Path]:
    """``--viz``: training curves, region weights across classes, an embedding plot; returns the files.

    - ``training_curves.png`` (per epoch, from log.jsonl: the loss with its weighted terms, the
      diagnostics, the teacher's entropies against log K, the k-NN where measured),
      ``step_curves.png`` (per step, from the run's CSV log when there is one; constants left
      out), ``knn_over_epochs.png`` (when the log has k-NN values);
    - ``region_weights.png``: the teacher's MIL weights on one test image per class (every class up
      to `_MAX_HEATMAP_CLASSES`, spread over the class list beyond; the title says how many), on
      the token grid with one colour scale and the uniform level 1/N marked, titled with the
      class, the discriminative part outlined where the dataset has masks (the synthetic data);
    - ``embedding.png``: t-SNE (PCA without scikit-learn) of the teacher's test features by class.
    The test split is used, or the train split when there is none.
    """
    from cmd import viz

    viz.plot_training_log(out_dir / "log.jsonl", out_dir / "training_curves.png")
    saved = [out_dir / "training_curves.png"]
    for csv_path in sorted(out_dir.glob("*.csv"))[:1]:
        try:
            viz.plot_step_curves(csv_path, out_dir / "step_curves.png")
            saved.append(out_dir / "step_curves.png")
        except (ValueError, KeyError) as err:
            print(f"--viz: no per-step curves from {csv_path.name}: {err}")
    try:
        viz.plot_knn_over_epochs(out_dir / "log.jsonl", out_dir / "knn_over_epochs.png")
        saved.append(out_dir / "knn_over_epochs.png")
    except (ValueError, KeyError):
        pass  # no k-NN rows in the log (--knn_every 0)

    transform = cmd.eval_transform(args.eval_size or args.global_size)
    masks_kw = {"return_part_mask": True} if args.dataset == "synthetic" else {}
    try:
        split, data = "test", build_data(args, "test", transform, **masks_kw)
    except SystemExit:  # no test split (a run with --no_knn): show training images
        split, data = "train", build_data(args, "train", transform, **masks_kw)
    targets = getattr(data, "targets", None)
    if targets is None:
        targets = [data[i][1] for i in range(len(data))]
    class_names = getattr(data, "classes", None)

    if teacher.head.pooling is not None:  # with no MIL pooling (a dino run) there are no region weights
        indices = viz.sample_across_classes(targets, per_class=1, max_images=_MAX_HEATMAP_CLASSES, seed=args.seed)
        samples = [data[i] for i in indices]
        images = torch.stack([s[0] for s in samples]).to(device)
        labels = [int(s[1]) for s in samples]
        part_masks = torch.stack([s[2] for s in samples]) if masks_kw else None
        n_classes = len(set(int(t) for t in targets))
        chosen = "every class" if len(indices) == n_classes else (
            f"{len(indices)} of {n_classes} classes, evenly spaced (at most {_MAX_HEATMAP_CLASSES})")
        viz.save_attention_grid(teacher, images, out_dir / "region_weights.png", labels=labels,
                                class_names=class_names, part_masks=part_masks, n_cols=min(5, len(indices)),
                                title=f"the teacher's MIL weights on one {split} image of {chosen}")
        saved.append(out_dir / "region_weights.png")

    plain = build_data(args, split, transform) if masks_kw else data  # (image, label) samples
    loader = DataLoader(plain, batch_size=64, num_workers=args.num_workers)
    features, labels_all = cmd.extract_features(teacher.backbone, loader, device=device, progress=False)
    try:
        viz.plot_embeddings(features, labels_all, out_dir / "embedding.png", method="tsne", seed=args.seed,
                            class_names=class_names)
    except ImportError:
        viz.plot_embeddings(features, labels_all, out_dir / "embedding.png", method="pca", seed=args.seed,
                            class_names=class_names)
    saved.append(out_dir / "embedding.png")
    print("saved " + ", ".join(str(p) for p in saved))
    return saved


def run(argv: list[str] | None = None) -> int:
    """The ``cmd-fgvc pretrain`` command: run `main`, return the process exit status (`cmd.cli.exit_status`).

    0 for a finished run, 75 for one interrupted by a signal or --max_steps (checkpoint saved,
    resumable), 2 for a non-finite loss, 3 for a collapse under --stop_on_collapse (after saving),
    1 for an unreadable image (after saving the epoch's steps), a failed write (a full disk: ENOSPC)
    or an unreadable checkpoint.
    """
    return run_command(main, argv, ((NonFiniteLossError, 2), (CollapseStop, COLLAPSE_EXIT_STATUS), (OSError, 1),
                                    (CheckpointError, 1), (DataLoadError, 1)), status=pretrain_status)


if __name__ == "__main__":
    sys.exit(run())
