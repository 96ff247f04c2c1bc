"""The least wall time a sweep can take on this machine: its FLOPs over the machine's matmul peak.

Run by hand (quiet machine). Counts the floating-point operations of a digits sweep from its config —
the shared tokenizer stage, every trial's training steps and its final evaluation's decoding passes —
and divides them by the fastest matrix multiply this machine runs. No implementation of the same
training can finish sooner: the floor assumes every FLOP at the matmul peak on every core and nothing
else (no data, no LayerNorm/GELU/dropout, no process start-up, no evaluation metrics, no pictures).

    python benchmarks/sweep_floor.py                           # the default sweep: 3 schedules x sweep_seeds
    python benchmarks/sweep_floor.py --points 3 trainer.max_steps=450 transformer.depth=2
    python benchmarks/sweep_floor.py experiment=digits_mage --points 4   # sweep=ratios: 4 distributions
    python benchmarks/sweep_floor.py experiment=digits_mage_finetune model.pretrained=PATH  # fine-tuning

What it prints, and how each number is obtained:
- FLOPs per step: `torch.utils.flop_counter.FlopCounterMode` around one real training step of the
  configured module (`masked_loss`: its masking, forward and masked-token loss; MAGE-C: both views and
  the contrastive term; fine-tuning: the classifier's forward and cross-entropy; backward; AdamW) at
  the preset's batch;
  the counter counts matmuls, batched matmuls and attention, i.e. everything the floor can charge;
- tokenizer stage: the same count for one step of the configured VQGAN (encode, quantize, decode, L2
  loss, backward) times `digits_tokenizer`'s steps;
- final evaluation: one decoding pass of the model over `evaluation.num_samples` sequences, times
  `decode.steps` (the tokenizer's decoding of the samples and the classifier's features are left out:
  the floor only gets lower); fine-tuning: the classifier over the val split; MAGE presets add the
  linear probe's feature pass over the digits;
- the peak: a 2048 x 2048 float32 matmul on one thread (x cores, the sweep's `sweep_jobs` one-thread
  trials) and on all threads; the larger rate is the machine's peak;
- the step as measured: the same training step timed on one thread, as a sweep trial runs it, to show
  how far a real step is from the peak (LayerNorm, GELU, dropout, softmax and the optimizer are not
  matmuls).

Why written here: neither Lightning's profilers nor torch's FLOP counter answer "can this sweep fit in
N minutes on this machine"; that needs the config's sweep size, the preset's stage and the machine's
measured peak put together, which is all this does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from conditions import matmul_rate, print_conditions

from lightning_mim.nn.vqgan import VQGAN
from lightning_mim.orchestration.config import compose


def counted(fn) -> int:
    """FLOPs FlopCounterMode sees while `fn()` runs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def stage2_module(cfg):
    """The configured stage-2 module (MaskGIT, MAGE, MAGE-C, fine-tuning), as `train` builds it (an
    untrained tokenizer: FLOPs do not depend on its weights)."""
    cfg.tokenizer.ckpt = None
    return instantiate(cfg.model, _recursive_=False, _convert_="all")


def is_classifier(module) -> bool:
    """Fine-tuning (`model=mage_finetune`): the module classifies images; it neither masks nor generates."""
    return not hasattr(module, "masked_loss")


def needs_images(module) -> bool:
    """Whether the module trains on image batches: MAGE-C's augmented views and the continuous-input
    ablation run the frozen tokenizer on every batch; the others read memoised token grids."""
    return bool(is_classifier(module) or getattr(module, "continuous_input", False) or module.hparams.get("contrastive", False))


def training_step(module, cfg, batch: int):
    """One step as the module trains: its own masking and loss (MAGE-C: reconstruction + contrastive
    on two views), then AdamW over the trainable parameters (the tokenizer is frozen)."""
    size = int(cfg.data.image_size)
    if needs_images(module):
        data = torch.rand(batch, 3, size, size)
    else:
        data = torch.randint(0, module.layout.codebook_size, (batch, module.n_tokens))
    classes = module.head.out_features if is_classifier(module) else getattr(module, "num_classes", 1)
    labels = torch.randint(0, max(1, classes), (batch,))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)  # the frozen tokenizer: none

    def step() -> None:
        if is_classifier(module):
            loss = module.loss(module(data), labels)
        elif module.hparams.get("contrastive", False):
            loss = module.contrastive_step(data)["loss"]
        else:
            loss, _ = module.masked_loss((data, labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def digits_split(cfg) -> tuple[int, int]:
    """(train, val) image counts of the embedded digits under `cfg`'s stratified split."""
    from lightning_mim.data.digits import DEFAULT_VAL_PER_CLASS, NUM_CLASSES, NUM_IMAGES

    val = NUM_CLASSES * int(cfg.data.get("val_per_class", DEFAULT_VAL_PER_CLASS))
    return NUM_IMAGES - val, val


def encoder_pass_flops(cfg, images: int, fn) -> int:
    """FLOPs of `fn(image chunk)` over `images` digits, counted on chunks of 256."""
    size, chunk = int(cfg.data.image_size), 256
    with torch.no_grad():
        per_chunk = counted(lambda: fn(torch.rand(chunk, 3, size, size)))
    return per_chunk * images // chunk


def evaluation_flops(module, cfg) -> tuple[int, str]:
    """(FLOPs, label) of a trial's final evaluation: `decode.steps` passes of the model over
    `evaluation.num_samples` sequences for a generator; the classifier over the val split for fine-tuning."""
    if is_classifier(module):
        _, val = digits_split(cfg)
        return encoder_pass_flops(cfg, val, module), f"classifier over {val} val images"
    samples, decode_steps = int(cfg.evaluation.num_samples), int(cfg.decode.steps)
    tokens = torch.randint(0, module.layout.codebook_size, (samples, module.n_tokens))
    with torch.no_grad():
        pass_flops = counted(lambda: module.logits_fn(None, samples)(tokens))
    return decode_steps * pass_flops, f"{decode_steps} passes x {samples} samples"


def probe_flops(module, cfg) -> tuple[int, int]:
    """(FLOPs, images) of the final linear probe's feature pass (`callbacks.linear_probe`: the encoder
    over the training and validation digits); (0, 0) without a probe. The probe's own fit (lbfgs on
    the features) is left out: the floor only gets lower."""
    probe = (cfg.get("callbacks") or {}).get("linear_probe")
    if not probe or not hasattr(module, "encode_features"):
        return 0, 0
    images = sum(min(n, int(limit)) if limit else n
                 for n, limit in zip(digits_split(cfg), (probe.get("max_train_samples"), probe.get("max_val_samples"))))
    return encoder_pass_flops(cfg, images, module.encode_features), images


def tokenizer_step(cfg) -> int:
    """FLOPs of one digits_tokenizer training step (encode, quantize, decode, L2 loss, backward)."""
    vqgan = VQGAN(**cfg.tokenizer.arch)
    images = torch.rand(int(cfg.data.batch_size), 3, int(cfg.data.image_size), int(cfg.data.image_size))

    def step() -> None:
        q = vqgan.quantize(vqgan.encode(images))
        (F.mse_loss(vqgan.decode(q.z_q), images) + q.loss).backward()

    return counted(step)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train overrides (experiment=digits_maskgit is the default)")
    parser.add_argument("--points", type=int, default=3, help="grid points (default 3: schedule=cosine,linear,sqrt)")
    parser.add_argument("--target", type=float, default=600.0, help="the wall-time target in seconds (default 600)")
    args = parser.parse_args(argv)

    cfg = compose(args.overrides)
    if "pretrained" in cfg.model.keys() and OmegaConf.is_missing(cfg.model, "pretrained"):
        parser.error("model.pretrained=???: a fine-tuning preset's architecture comes from its pre-trained "
                     "checkpoint; pass model.pretrained=PATH (a last.ckpt of experiment=digits_mage)")
    tokenizer_cfg = compose(["experiment=digits_tokenizer"])
    seeds, steps, batch = int(cfg.sweep_seeds), int(cfg.trainer.max_steps), int(cfg.data.batch_size)
    trials = args.points * seeds
    cores = os.cpu_count() or 1

    torch.manual_seed(0)
    module = stage2_module(cfg)
    step = training_step(module, cfg, batch)
    step_flops = counted(step)
    module.eval()
    evaluation, evaluation_label = evaluation_flops(module, cfg)
    probe, probe_images = probe_flops(module, cfg)
    module.train()
    tokenizer_flops = tokenizer_step(tokenizer_cfg) * int(tokenizer_cfg.trainer.max_steps)

    rows = [
        (f"tokenizer stage ({int(tokenizer_cfg.trainer.max_steps)} steps, once)", tokenizer_flops),
        (f"training: {trials} trials x {steps} steps x {step_flops / 1e9:.2f} GFLOP", trials * steps * step_flops),
        (f"final evaluations: {trials} x {evaluation_label}", trials * evaluation),
        *([(f"final linear probes: {trials} x encoder over {probe_images} images", trials * probe)] if probe else []),
    ]
    total = sum(f for _, f in rows)

    one_thread = matmul_rate(1)
    all_threads = matmul_rate(cores)
    peak = max(one_thread * cores, all_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            step()
        step_seconds = min(_timed(step) for _ in range(10))
    finally:
        torch.set_num_threads(before)

    print_conditions(one_thread)
    print(f"sweep: {' '.join(args.overrides) or 'experiment=digits_maskgit (defaults)'}; {args.points} points x "
          f"{seeds} seeds = {trials} trials; torch {torch.__version__}, {cores} cores")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    tokens = f"{module.n_tokens} image tokens, " if hasattr(module, "n_tokens") else ""
    print(f"model: {type(module).__name__}, {trainable / 1e6:.2f} M trainable parameters, {tokens}"
          f"batch {batch}; FLOPs counted by torch.utils.flop_counter (matmuls, attention)")
    print(f"{'work':<62} {'TFLOP':>8} {'share':>6}")
    for label, flops in rows:
        print(f"{label:<62} {flops / 1e12:8.2f} {flops / total:6.1%}")
    print(f"{'total':<62} {total / 1e12:8.2f}")
    print(f"matmul peak: {one_thread / 1e9:.1f} GFLOP/s on one thread ({cores} x = {one_thread * cores / 1e9:.1f}), "
          f"{all_threads / 1e9:.1f} GFLOP/s on {cores} threads; peak used: {peak / 1e9:.1f} GFLOP/s")
    print(f"one training step measured on one thread: {step_seconds * 1e3:.0f} ms = "
          f"{step_flops / step_seconds / 1e9:.1f} GFLOP/s ({step_flops / step_seconds / one_thread:.0%} of the one-thread peak)")
    floor = total / peak
    at_step_rate = rows[0][1] / peak + (total - rows[0][1]) * step_seconds / step_flops / cores
    print(f"floor (every FLOP at the peak on every core, nothing else): {floor:.0f} s = {floor / 60:.1f} min; "
          f"target {args.target:.0f} s: {'below' if floor <= args.target else 'ABOVE'} it ({floor / args.target:.2f}x)")
    print(f"at the measured step rate (trials {cores} at a time, one thread each; tokenizer at the peak): "
          f"{at_step_rate:.0f} s = {at_step_rate / 60:.1f} min ({at_step_rate / args.target:.2f}x the target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
