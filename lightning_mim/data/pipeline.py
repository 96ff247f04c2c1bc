"""Reading shards: safe decoding, transforms, the corrupt-sample counter and the two loader shapes.

Safety: samples are decoded by our own step, which reads only an image entry (png/jpg/jpeg/webp,
opened with the matching Pillow decoder only), `cls` (a decimal integer), `json` and, for token
shards, `tokens` (raw integers). Every other entry is dropped undecoded; nothing from a shard is
ever unpickled (webdataset's `.decode()` would unpickle `.pyd`/`.pickle` entries, so we don't use it).

Two loader shapes (docs/DEPENDENCIES.md, webdataset 1.0.2):
- training: every rank and worker draws shards *with replacement* from the whole list (no node
  splitting, `_ResampledShards`), shuffles samples in a buffer, decodes, batches inside the worker;
  `FixedBatches` then yields exactly `batches_per_epoch` batches per epoch on every rank, so DDP ranks
  stay in step and never hang at the end of an epoch. Every draw (shards, shuffle, each sample's
  augmentation) is seeded by (seed, rank, worker, epoch) alone, so a resumed run replays an epoch.
- evaluation: an exact, finite pass: shards split by rank, then by worker (each shard read by exactly
  one (rank, worker)), no shuffling, partial last batches; the same order on every pass. A rank with
  fewer shards yields fewer batches: give val sets a shard count divisible by world_size × workers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from contextlib import contextmanager
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_mim.data.folder import interpolation_mode
from lightning_mim.data.shards import TOKEN_EXT, check_local_shards

log = logging.getLogger("lightning_mim.data")

# extension -> the only Pillow decoder allowed to open it
IMAGE_EXTS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# entries that other tools pickle; we drop them undecoded and say so once per process
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "npy", "npz", "mp", "msgpack", "ten"})
AUGMENT_DEFAULTS: dict[str, Any] = {  # the papers' training augmentation (MAGE main_pretrain, MaskGIT config)
    "random_resized_crop": True,
    "scale": (0.2, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "hflip": True,
}
NO_AUGMENT: dict[str, Any] = {"random_resized_crop": False, "hflip": False}
_pickle_warned = False


class CorruptSample(ValueError):
    """A sample (or shard) that cannot be decoded."""


# ---------------------------------------------------------------------------------------- decoding


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _note_ignored(sample: dict, allowed: set[str]) -> None:
    global _pickle_warned
    pickled = [k for k in sample if not k.startswith("__") and k not in allowed and k.split(".")[-1] in PICKLE_EXTS]
    if pickled and not _pickle_warned:
        _pickle_warned = True
        log.warning("ignoring pickled entries (%s) in %s: shard entries are never unpickled", ", ".join(pickled), _where(sample))


def decode_label(data: bytes, sample: dict) -> int:
    try:
        label = int(bytes(data).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptSample(f"{_where(sample)}: cls is not an integer: {bytes(data)[:20]!r}") from err
    if label < 0:
        raise CorruptSample(f"{_where(sample)}: negative label {label}")
    return label


def decode_image_sample(sample: dict) -> tuple[Image.Image, int, dict | None]:
    """(RGB PIL image, label, json metadata or None) from a raw webdataset sample dict."""
    found = [k for k in sample if k in IMAGE_EXTS]
    _note_ignored(sample, {*found, "cls", "json"})
    if len(found) != 1:
        raise CorruptSample(f"{_where(sample)}: expected one image entry ({'/'.join(IMAGE_EXTS)}), found {found or 'none'}")
    if "cls" not in sample:
        raise CorruptSample(f"{_where(sample)}: no cls entry")
    label = decode_label(sample["cls"], sample)
    ext = found[0]
    try:
        with Image.open(io.BytesIO(sample[ext]), formats=[IMAGE_EXTS[ext]]) as opened:
            image = opened.convert("RGB")  # full decode here: truncated data raises now, not later
    except Exception as err:
        raise CorruptSample(f"{_where(sample)}: unreadable {ext}: {err}") from err
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as err:
            raise CorruptSample(f"{_where(sample)}: bad json: {err}") from err
    return image, label, meta


def decode_token_sample(sample: dict, dtype: str | np.dtype, length: int) -> tuple[np.ndarray, int]:
    """(int64 tokens (length,), label) from a raw token-shard sample."""
    _note_ignored(sample, {TOKEN_EXT, "cls", "json"})
    if TOKEN_EXT not in sample or "cls" not in sample:
        raise CorruptSample(f"{_where(sample)}: token samples need '{TOKEN_EXT}' and 'cls' entries, found {sorted(sample)}")
    data = sample[TOKEN_EXT]
    dtype = np.dtype(dtype)
    if len(data) != length * dtype.itemsize:
        raise CorruptSample(f"{_where(sample)}: {len(data)} token bytes, expected {length} x {dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).astype(np.int64), decode_label(sample["cls"], sample)


# -------------------------------------------------------------------------------------- transforms


def augment_options(train_augment: dict | bool | None) -> dict[str, Any]:
    """Complete a `train_augment` setting: None/True = the papers' augmentation, False = none,
    a dict overrides single keys of the papers' setting. Unknown keys are an error."""
    if train_augment is None or train_augment is True:
        return dict(AUGMENT_DEFAULTS)
    if train_augment is False:
        return {**AUGMENT_DEFAULTS, **NO_AUGMENT}
    unknown = sorted(set(train_augment) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown train_augment key(s) {', '.join(unknown)}; valid: {', '.join(AUGMENT_DEFAULTS)}")
    options = {**AUGMENT_DEFAULTS, **train_augment}
    for key in ("scale", "ratio"):
        lo, hi = (float(v) for v in options[key])
        if not 0 < lo <= hi:
            raise ValueError(f"train_augment.{key} must be 0 < lo <= hi, got {options[key]}")
        options[key] = (lo, hi)
    if options["scale"][1] > 1:
        raise ValueError(f"train_augment.scale must be within (0, 1], got {options['scale']}")
    return options


class ImageTransform:
    """PIL image -> float32 (3, S, S) in [0, 1].

    eval (and training without random_resized_crop): resize the shorter side to S + centre crop S
    (deterministic). training: RandomResizedCrop(S, scale, ratio) and/or a horizontal flip (p = 0.5).
    """

    def __init__(self, image_size: int, *, train: bool = False, augment: dict | bool | None = None, interpolation: str = "bicubic"):
        from torchvision.transforms import v2

        self.image_size = int(image_size)
        self.mode = interpolation_mode(interpolation)
        options = augment_options(augment) if train else {**AUGMENT_DEFAULTS, **NO_AUGMENT}
        self.crop = None
        if options["random_resized_crop"]:
            self.crop = v2.RandomResizedCrop(
                self.image_size, scale=options["scale"], ratio=options["ratio"], interpolation=self.mode, antialias=True
            )
        self.flip = v2.RandomHorizontalFlip(0.5) if options["hflip"] else None
        self.options = options

    @property
    def is_random(self) -> bool:
        """Whether the transform draws random numbers (a random crop or flip)."""
        return self.crop is not None or self.flip is not None

    def __call__(self, image: Image.Image) -> Tensor:
        return self.to_uint8(image).float().div_(255.0)

    def to_uint8(self, image: Image.Image) -> Tensor:
        """The same transform, as uint8 (3, S, S): loaders batch uint8 and convert once per batch
        (a quarter of the memory traffic of stacking float images)."""
        from torchvision.transforms.v2 import functional as F

        size = self.image_size
        if self.crop is not None:
            image = self.crop(image)
        else:
            if min(image.size) != size:
                image = F.resize(image, size, interpolation=self.mode, antialias=True)
            if image.size != (size, size):
                image = F.center_crop(image, [size, size])
        if self.flip is not None:
            image = self.flip(image)
        return F.pil_to_tensor(image)


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Inside the block torch's CPU generator draws from `seed` (the training stream's seed for one
    sample), and afterwards from where it was; None: leave it alone."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


class _ImageMap:
    """raw sample -> (float image, label); a picklable class so `spawn` workers work."""

    def __init__(self, transform: ImageTransform, counter: "CorruptCounter"):
        self.transform, self.counter = transform, counter

    def __call__(self, sample: dict) -> tuple[Tensor, int]:
        image, label, _ = decode_image_sample(sample)
        with _seeded(sample.get("__seed__") if self.transform.is_random else None):
            out = self.transform.to_uint8(image), label
        self.counter.success()
        return out


class _TokenMap:
    def __init__(self, dtype: str, length: int, counter: "CorruptCounter"):
        self.dtype, self.length, self.counter = dtype, length, counter

    def __call__(self, sample: dict) -> tuple[Tensor, int]:
        tokens, label = decode_token_sample(sample, self.dtype, self.length)
        self.counter.success()
        return torch.from_numpy(tokens), label


def collate_pairs(samples: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """[(x, label)] -> (stacked x, int64 labels); uint8 images become float32 in [0, 1] here."""
    xs, ys = zip(*samples)
    batch = torch.stack(xs)
    if batch.dtype == torch.uint8:
        batch = batch.float().div_(255.0)
    return batch, torch.tensor(ys, dtype=torch.int64)


# ---------------------------------------------------------------------------------- error counting


class CorruptCounter:
    """webdataset error handler that warns, counts and goes on (no sleep, unlike `warn_and_continue`).

    The count lives in a shared-memory tensor with one slot per DataLoader worker, so the main
    process sees errors counted inside workers (`count`). Every error event counts: a bad sample in
    a resampled training stream counts each time it is drawn. `max_consecutive` errors in a row in
    one process without a single good sample (a broken URL, every shard unreadable) raise instead
    of looping forever.
    """

    SLOTS = 256

    def __init__(self, name: str = "data", max_consecutive: int | None = 100):
        self.name = name
        self.max_consecutive = max_consecutive
        self._counts = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()
        self._consecutive = 0
        self._logged = 0

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (CorruptCounter.SLOTS - 1)

    def __call__(self, exn: BaseException) -> bool:
        self._counts[self._slot()] += 1
        self._consecutive += 1
        self._logged += 1
        if self._logged <= 10:
            log.warning("skipping unreadable %s sample: %s", self.name, exn)
        elif self._logged == 11:
            log.warning("more unreadable %s samples; not logging each (see the corrupt count)", self.name)
        if self.max_consecutive is not None and self._consecutive > self.max_consecutive:
            raise RuntimeError(
                f"{self._consecutive} {self.name} read errors in a row without one good sample; "
                f"the shards look unreadable. Last error: {exn}"
            ) from exn
        return True

    def success(self) -> None:
        self._consecutive = 0

    @property
    def count(self) -> int:
        return int(self._counts.sum())


# ------------------------------------------------------------------------------ seeds and splitting


def is_distributed() -> bool:
    """True when a default torch.distributed process group is initialised (collectives then reach every rank)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info(rank: int | None = None, world_size: int | None = None, *, from_env: bool = True) -> tuple[int, int]:
    """(rank, world_size): explicit values, else the initialised process group, else env RANK/WORLD_SIZE
    (only with `from_env`), else (0, 1). Raises ValueError unless 0 <= rank < world_size.

    Data loaders read the launcher's env so they split shards before a process group exists. Code that
    runs collectives (the evaluation's gathers and barriers) passes `from_env=False`: without a process
    group its collectives are no-ops, so it must see itself as rank 0 of 1.
    """
    if rank is not None and world_size is not None:
        r, w = int(rank), int(world_size)
    elif is_distributed():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif from_env and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        r, w = 0, 1
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside world size {w}")
    return r, w


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash() of strings)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class _Epoch:
    """The training pass (1 for the first) that a stage of the training pipeline is in.

    The main process sets `value` before each pass (`FixedBatches`). A stage running in the main
    process (`num_workers=0`) reads it as it is. A stage running in a worker reads the copy made when
    the worker started: a fresh copy every pass, or, with persistent workers, the copy of their first
    pass, after which the stage adds the passes it has made since. So every random draw of the
    pipeline is a function of (seed, rank, worker, pass) alone, whatever the loader's settings, and a
    resumed run (`FixedBatches.resume`) replays a pass by setting one number.
    """

    def __init__(self) -> None:
        self.value = 0

    def of_pass(self, passes_in_this_copy: int) -> int:
        """The pass number, given how many passes the asking stage has begun in this copy (>= 1)."""
        if passes_in_this_copy < 1:
            raise ValueError(f"passes_in_this_copy must be >= 1, got {passes_in_this_copy}")
        if torch.utils.data.get_worker_info() is None:
            return self.value
        return self.value + passes_in_this_copy - 1


class _PassSeeded:
    """A stage of the training pipeline whose draws are seeded per (seed, rank, worker, pass) (`_Epoch`);
    `stream` keeps the seeds of two stages apart. `_pass_seed()` starts a pass and returns its seed."""

    def __init__(self, seed: int, rank: int, epoch: _Epoch, stream: int):
        self.seed, self.rank, self.epoch, self.stream = seed, rank, epoch, stream
        self._passes = 0  # passes begun in this copy of the stage

    def _pass_seed(self) -> int:
        self._passes += 1
        return _seed(self.seed, self.rank, _worker_id(), self.epoch.of_pass(self._passes), self.stream)


class _ResampledShards(_PassSeeded, torch.utils.data.IterableDataset):
    """Endless shard URLs drawn with replacement, seeded per (seed, rank, worker, pass).

    What webdataset's `ResampledShards` does, except for its seed: that one mixes in a pass counter
    of its own, which a resumed run cannot set (a fresh process starts it at 0 while the interrupted
    main-process loader had counted every epoch), so a resumed epoch would read other shards.
    """

    def __init__(self, urls: Sequence[str], seed: int, rank: int, epoch: _Epoch):
        if not urls:
            raise ValueError("no training shards to draw from")
        super().__init__(seed, rank, epoch, stream=0)
        self.urls = list(urls)

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self._pass_seed())
        while True:
            yield {"url": rng.choice(self.urls)}


class _SeededShuffle(_PassSeeded):
    """Sample shuffle buffer seeded per (seed, rank, worker, pass); it also gives each sample the seed
    of its random augmentation (`__seed__`: the pass's seed + the sample's index in the pass), so the
    augmentation draws neither from the main process's generator, which training uses, nor from a
    worker's, whose state a resumed run could not restore."""

    def __init__(self, bufsize: int, seed: int, rank: int, epoch: _Epoch):
        super().__init__(seed, rank, epoch, stream=1)
        self.bufsize = bufsize

    def __call__(self, src: Iterator) -> Iterator:
        import webdataset as wds

        pass_seed = self._pass_seed()
        if self.bufsize >= 2:
            src = wds.shuffle(self.bufsize, min(self.bufsize, 100), rng=random.Random(pass_seed))(src)
        for index, sample in enumerate(src):
            sample["__seed__"] = (pass_seed + index) % 2**63
            yield sample


class _SplitByRank:
    """Shard-level node split with a rank fixed in the main process (webdataset's split_by_node asks
    torch.distributed inside the worker, which is not initialised in spawned workers)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable) -> Iterator:
        return islice(src, self.rank, None, self.world_size)


# ------------------------------------------------------------------------------------ loader shapes


class FixedBatches:
    """Exactly `num_batches` batches per iteration from an endless DataLoader (one training epoch).

    Has `__len__`, so Lightning knows the epoch length (progress bar, schedulers). Each iteration
    bumps the epoch seen by freshly started workers, so epochs differ.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, num_batches: int, epoch: _Epoch):
        if num_batches < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {num_batches}")
        self.loader, self.num_batches, self._epoch = loader, int(num_batches), epoch
        self._skip = 0
        self._generator_seed = loader.generator.initial_seed() if loader.generator is not None else None

    def __len__(self) -> int:
        return self.num_batches

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue as the uninterrupted run would: the next pass is epoch `epoch` (0-based, Lightning's
        `current_epoch`) from its batch `batches_done` on.

        The stream of an epoch is a function of (seed, rank, worker, epoch) (`_Epoch`): the epoch
        counter is set, the DataLoader's generator (which draws the workers' torch seeds once per
        pass; nothing of ours draws from them, a user's transform might) is replayed to that pass, and
        the first `batches_done` batches are produced again and dropped. Why not torchdata's
        StatefulDataLoader (or Lightning's support for loaders with `state_dict`): webdataset's
        stages (tar iteration, the shuffle buffer) keep no state it could save, and Lightning asks a
        loader for its state while its prefetcher already holds batches the training has not seen;
        replaying the seeded pass is the exact way back, at the cost of reading `batches_done`
        batches once more.
        """
        if not 0 <= int(batches_done) <= self.num_batches or int(epoch) < 0:
            raise ValueError(f"cannot resume at epoch {epoch}, batch {batches_done} of {self.num_batches}")
        self._epoch.value = int(epoch)  # the next pass bumps it to epoch + 1, as pass number epoch did
        self._skip = int(batches_done)
        if self._generator_seed is not None:
            self.loader.generator.manual_seed(self._generator_seed)
            for _ in range(int(epoch)):  # one draw per earlier pass (DataLoader._get_shared_seed)
                torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)

    def __iter__(self) -> Iterator:
        # a generator: nothing starts (no workers, no epoch bump) until the first batch is asked for
        self._epoch.value += 1
        skip, self._skip = self._skip, 0
        batches = iter(self.loader)
        for produced in range(self.num_batches):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the training stream ended after {produced} batches; are all shards unreadable?") from None
            if produced >= skip:
                yield batch


class EvalBatches:
    """A finite pass over a DataLoader, optionally limited to the first `limit` batches."""

    def __init__(self, loader: torch.utils.data.DataLoader, limit: int | None = None):
        self.loader, self.limit = loader, limit

    def __iter__(self) -> Iterator:
        yield from islice(self.loader, self.limit)


def _data_loader(pipeline, num_workers: int, seed: int, rank: int, pin_memory: bool, persistent_workers: bool):
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,  # batches are made inside the workers
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(_seed(seed, rank, 2)),  # worker torch seeds (augmentation)
    )


def train_loader(
    urls: str | Sequence[str],
    sample_map: Callable[[dict], Any],
    *,
    batch_size: int,
    batches_per_epoch: int,
    counter: CorruptCounter,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> FixedBatches:
    """Endless resampled stream -> `batches_per_epoch` batches of `batch_size` per epoch."""
    import webdataset as wds

    expanded = check_local_shards(urls)
    rank, _ = dist_info(rank, world_size)
    epoch = _Epoch()
    pipeline = wds.DataPipeline(
        _ResampledShards(expanded, seed, rank, epoch),
        wds.tarfile_to_samples(handler=counter),
        _SeededShuffle(shuffle_buffer, seed, rank, epoch),
        wds.map(sample_map, handler=counter),
        wds.batched(batch_size, collation_fn=collate_pairs, partial=False),
    )
    loader = _data_loader(pipeline, num_workers, seed, rank, pin_memory, persistent_workers)
    return FixedBatches(loader, batches_per_epoch, epoch)


def eval_loader(
    urls: str | Sequence[str],
    sample_map: Callable[[dict], Any],
    *,
    batch_size: int,
    counter: CorruptCounter,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    limit: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> EvalBatches:
    """Exact pass: this rank's shards (every world_size-th), split over workers, in order."""
    import webdataset as wds

    expanded = check_local_shards(urls)
    rank, world_size = dist_info(rank, world_size)
    if len(expanded) < world_size:
        log.warning("%d shards for %d ranks: some ranks get no evaluation data", len(expanded), world_size)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expanded),
        _SplitByRank(rank, world_size),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=counter),
        wds.map(sample_map, handler=counter),
        wds.batched(batch_size, collation_fn=collate_pairs, partial=True),
    )
    loader = _data_loader(pipeline, num_workers, 0, rank, pin_memory, persistent_workers)
    return EvalBatches(loader, limit)


def image_map(image_size: int, *, train: bool, augment: dict | bool | None = None, interpolation: str = "bicubic", counter: CorruptCounter) -> _ImageMap:
    """The decode + transform step of image loaders."""
    return _ImageMap(ImageTransform(image_size, train=train, augment=augment, interpolation=interpolation), counter)


def token_map(dtype: str, length: int, counter: CorruptCounter) -> _TokenMap:
    """The decode step of token loaders: raw integers -> int64 (length,)."""
    return _TokenMap(str(np.dtype(dtype).str), int(length), counter)


def iter_image_samples(
    urls: str | Sequence[str],
    *,
    image_size: int | None = None,
    interpolation: str = "bicubic",
    transform: Callable[[Image.Image], Tensor] | None = None,
    counter: CorruptCounter | None = None,
) -> Iterator[tuple[str, Tensor, int]]:
    """(key, float (3, H, W) image in [0, 1], label) for every sample, in shard order, in this process.

    For tools that need the keys (tokenizing, inspection). `image_size` None keeps the stored size;
    `image_size` S gives the eval preprocessing (resize + centre crop); `transform` (PIL image ->
    tensor, e.g. `ImageTransform(S, train=True)` for augmented copies) replaces both.
    """
    import webdataset as wds
    from torchvision.transforms.v2.functional import pil_to_tensor

    counter = counter or CorruptCounter("tool")
    if transform is None and image_size:
        transform = ImageTransform(image_size, interpolation=interpolation)
    pipeline = wds.DataPipeline(wds.SimpleShardList(check_local_shards(urls)), wds.tarfile_to_samples(handler=counter))
    for sample in pipeline:
        try:
            image, label, _ = decode_image_sample(sample)
        except CorruptSample as err:
            counter(err)
            continue
        counter.success()
        tensor = transform(image) if transform is not None else pil_to_tensor(image).float().div_(255.0)
        yield sample["__key__"], tensor, label
