"""The NVIDIA DALI backend: one pipeline definition, run on the GPU or the CPU.

`data.dali_device: gpu` decodes JPEGs with the `mixed` (nvJPEG) decoder and augments on
the GPU; `cpu` does everything on the CPU (what tests and CI run). The file lists come
from files.py (bad files already left out) and the order from sampling.py, so DALI reads
the same images in the same order as the torchvision backend.

Each epoch gets its own pipeline over an explicit file list: this rank's slice of every
global batch of that epoch's global shuffle. That gives a true global reshuffle every
epoch (DALI's `random_shuffle` only shuffles inside a small buffer), an exact and equal
epoch length on every rank, and no sample twice in an epoch. The pipeline is built with
`enable_checkpointing=True`; its checkpoint (reader position and augmentation RNG states)
is the loader's state, so a run resumed inside an epoch sees the same batches.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from powergrad_train.config import DataConfig
from powergrad_train.data import TrainLoader, ValLoader, resolve_root
from powergrad_train.data.files import SkippedFiles
from powergrad_train.data.sampling import TrainSampler, sample_seed
from powergrad_train.errors import ConfigError, ImageError

MEAN = [255 * m for m in IMAGENET_DEFAULT_MEAN]
STD = [255 * s for s in IMAGENET_DEFAULT_STD]


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch as dali_torch
    except ImportError:
        # DALI wheels are built per CUDA major version; name the one that matches this torch.
        extra = "dali-cuda12" if (torch.version.cuda or "").startswith("12.") else "dali"
        raise ConfigError(f"data.backend = dali needs NVIDIA DALI: pip install -e '.[{extra}]' "
                          "(or use data.backend: torchvision)") from None
    return dali, dali_torch


def placement(cfg: DataConfig) -> str:
    """'gpu' or 'cpu' for data.dali_device (auto = gpu when CUDA is available)."""
    cuda = torch.cuda.is_available()
    if cfg.dali_device == "gpu" and not cuda:
        raise ConfigError("data.dali_device = gpu needs a CUDA GPU; use cpu (or auto) on this machine")
    return "gpu" if cfg.dali_device == "gpu" or (cfg.dali_device == "auto" and cuda) else "cpu"


def _pipeline(cfg: DataConfig, files: list[str], labels: list[int], batch_size: int, seed: int, train: bool,
              checkpoint=None):
    """Decode, crop/resize, flip and normalise, on the GPU ('mixed' decoder) or the CPU."""
    dali, _ = _dali()
    fn, types = dali.fn, dali.types
    on_gpu = placement(cfg) == "gpu"
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=max(1, cfg.workers),
                         device_id=torch.cuda.current_device() if on_gpu else None,
                         seed=seed % (1 << 31), enable_checkpointing=True, checkpoint=checkpoint)
    decoder = "mixed" if on_gpu else "cpu"
    with pipe:
        jpegs, targets = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=[cfg.crop_scale_min, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
            images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size,
                               interp_type=types.INTERP_LINEAR)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=int(cfg.image_size / cfg.crop_pct),
                               interp_type=types.INTERP_CUBIC if cfg.val_interpolation == "bicubic"
                               else types.INTERP_LINEAR)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, crop=(cfg.image_size, cfg.image_size), crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
            mean=MEAN, std=STD, dtype=types.FLOAT, output_layout="CHW")
        pipe.set_outputs(images, targets.gpu() if on_gpu else targets)
    pipe.build()
    return pipe


def _with_stand_ins(files: list[str], labels: list[int], batch_size: int, stood_in: set[str]):
    """(files, labels, kept rows per batch or None for all): each file in `stood_in` replaced by a
    good file of its own batch, whose copy is then left out of the batch."""
    files, labels, kept = list(files), list(labels), []
    for first in range(0, len(files), batch_size):
        rows = range(first, min(first + batch_size, len(files)))
        good = [i for i in rows if files[i] not in stood_in]
        if not good:
            raise ImageError(files[first], "DALI cannot decode it; and every other image of its batch on this "
                                           f"process ({len(rows)} in all) cannot be decoded either")
        for i in rows:
            if files[i] in stood_in:
                files[i], labels[i] = files[good[0]], labels[good[0]]
        kept.append(None if len(good) == len(rows) else [i - first for i in good])
    return files, labels, kept


def _undecodable(cfg: DataConfig, files: list[str]) -> list[str]:
    """The files DALI's decoder cannot decode, found one at a time (a failure ends its pipeline,
    so the next pipeline starts after it)."""
    dali, _ = _dali()
    on_gpu = placement(cfg) == "gpu"
    bad, rest = [], list(files)
    while rest:
        pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=torch.cuda.current_device() if on_gpu else None,
                             prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            encoded, _ = dali.fn.readers.file(files=rest, random_shuffle=False)
            pipe.set_outputs(dali.fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu",
                                                    output_type=dali.types.RGB))
        pipe.build()
        failed = None
        for i in range(len(rest)):
            try:
                pipe.run()
            except RuntimeError:
                failed = i
                break
        del pipe
        if failed is None:
            break
        bad.append(rest[failed])
        rest = rest[failed + 1:]
    return bad


PREFETCHED = 2  # batches a pipeline runs ahead (DALI's prefetch_queue_depth): a failure may belong to one


def _read(cfg: DataConfig, files: list[str], labels: list[int], batch_size: int, list_start: int, first: int,
          stood_in: set[str], skipped: SkippedFiles, make_iterator):
    """Batches `first`, `first + 1`, ... of the file list through DALI.

    `make_iterator(files, labels, list_start, stood_in)` gives an iterator over the list from
    batch `list_start` on, whose first batch is `first` (later when it resumes a checkpoint).
    When a batch fails to decode, its files (or those of the batches run ahead) are decoded one
    by one to find the culprits, which `skipped` records; the pass goes on from the first batch
    not yet delivered, with a new pipeline in which they are stood in for (see _with_stand_ins).
    So every other image keeps its batch and every process its number of batches. A failure
    that no file explains is raised as it is.
    """
    while True:
        rest_files, rest_labels, kept = _with_stand_ins(files[list_start * batch_size:],
                                                        labels[list_start * batch_size:], batch_size, stood_in)
        delivered = first
        try:
            for batch in make_iterator(rest_files, rest_labels, list_start, stood_in):
                images, targets = batch[0]["images"], batch[0]["labels"].squeeze(1).long()
                rows = kept[delivered - list_start]
                if rows is not None:
                    images, targets = images[rows], targets[rows]
                yield images, targets
                delivered += 1
            return
        except RuntimeError:  # what a DALI pipeline raises when an operator fails
            bad = []
            for b in range(delivered, delivered + PREFETCHED + 1):
                candidates = [f for f in files[b * batch_size:(b + 1) * batch_size] if f not in stood_in]
                if bad := _undecodable(cfg, candidates):
                    break
            if not bad:
                raise
        stood_in, list_start, first = stood_in | set(bad), delivered, delivered
        _with_stand_ins(files[list_start * batch_size:], labels[list_start * batch_size:], batch_size, stood_in)
        for path in bad:  # (unless a batch is left with none: an error, above)
            skipped.add(path, "DALI cannot decode it")


class DaliTrainLoader(TrainLoader):
    """This rank's training batches through a per-epoch DALI pipeline. A file that fails to decode
    is left out of its batch (see _read); every other image keeps its batch."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], seed: int, rank: int, world_size: int):
        self.cfg, self.samples, self.seed, self.rank = cfg, samples, seed, rank
        self.sampler = TrainSampler(len(samples), cfg.batch_size, rank, world_size, seed)
        self.num_samples = len(samples)
        self.skipped = SkippedFiles(resolve_root(cfg) / "train", "training")
        self.epoch, self.start_batch = 0, 0
        self._restore = None  # a saved position to resume from, for the next pass
        self._iterator = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @batches_per_epoch.setter
    def batches_per_epoch(self, batches: int) -> None:
        self.sampler.batches_per_epoch = batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def restore(self, state: dict) -> None:
        self._restore = state

    def state(self) -> dict:
        """Where the current pass stands: the batch its file list starts at, the files stood in for in
        that list, and DALI's checkpoint."""
        return {"list_start": self._list_start, "stood_in": sorted(self._stood_in),
                "pipeline": self._iterator.checkpoints()[0]}

    def close(self) -> None:
        self._iterator = None  # releases the pipeline and its threads

    def __iter__(self):
        _dali()
        saved, self._restore = self._restore, None
        self.sampler.set_epoch(self.epoch)
        indices = [i for i, _ in self.sampler]
        start = saved["list_start"] if saved else self.start_batch
        stood_in = set(saved.get("stood_in", ())) if saved else self.skipped.earlier | set(self.skipped.found)
        first_seed = sample_seed(self.seed, self.epoch, self.rank)

        def make_iterator(files, labels, list_start, stood):
            _, dali_torch = _dali()
            self._iterator = None  # release the previous pipeline first
            again = list_start != start  # started again after a bad file: a seed of its own, still reproducible
            pipe = _pipeline(self.cfg, files, labels, self.sampler.local_batch,
                             sample_seed(first_seed, self.epoch, list_start) if again else first_seed, train=True,
                             checkpoint=saved["pipeline"] if saved and not again else None)
            self._list_start, self._stood_in = list_start, stood
            self._iterator = dali_torch.DALIGenericIterator(
                pipe, ["images", "labels"], reader_name="Reader",
                last_batch_policy=dali_torch.LastBatchPolicy.DROP, auto_reset=False)
            return self._iterator

        return _read(self.cfg, [self.samples[i][0] for i in indices], [self.samples[i][1] for i in indices],
                     self.sampler.local_batch, start, self.start_batch, stood_in, self.skipped, make_iterator)


class DaliValLoader(ValLoader):
    """Every val image once across ranks; the last batch may be short (PARTIAL, no padding). A file
    that fails to decode is left out and said (so the images counted in the result are one fewer)."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], rank: int, world_size: int):
        mine = samples[rank::world_size]
        self.cfg, self.num_samples = cfg, len(samples)
        self.files, self.labels = [p for p, _ in mine], [label for _, label in mine]
        self.batch = cfg.val_batch_per_process(world_size)
        self.skipped = SkippedFiles(resolve_root(cfg) / "val", "validation")
        self._iterator, self._stood_in = None, None  # a pipeline over the whole list, kept for every pass
        stood_in = set(self.skipped.earlier)
        files, labels, _ = _with_stand_ins(self.files, self.labels, self.batch, stood_in)
        self._whole_list(files, labels, stood_in)

    def _whole_list(self, files, labels, stood_in):
        _, dali_torch = _dali()
        self._iterator = None
        pipe = _pipeline(self.cfg, files, labels, self.batch, seed=0, train=False)
        self._iterator = dali_torch.DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader", last_batch_policy=dali_torch.LastBatchPolicy.PARTIAL,
            auto_reset=True, prepare_first_batch=False)
        self._stood_in = stood_in
        return self._iterator

    def __iter__(self):
        def make_iterator(files, labels, first_batch, stood_in):
            if first_batch == 0:
                return self._iterator if stood_in == self._stood_in else self._whole_list(files, labels, stood_in)
            _, dali_torch = _dali()  # the rest of a pass after a bad file
            pipe = _pipeline(self.cfg, files, labels, self.batch, seed=0, train=False)
            return dali_torch.DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                                  last_batch_policy=dali_torch.LastBatchPolicy.PARTIAL)

        return _read(self.cfg, self.files, self.labels, self.batch, 0, 0, self.skipped.earlier | set(self.skipped.found),
                     self.skipped, make_iterator)

    def close(self) -> None:
        self._iterator = None


def build_train(cfg: DataConfig, samples, seed: int, rank: int, world_size: int,
                device: torch.device) -> DaliTrainLoader:
    placement(cfg)  # a gpu request on a machine without CUDA fails here, before any pipeline
    return DaliTrainLoader(cfg, samples, seed, rank, world_size)


def build_val(cfg: DataConfig, samples, rank: int, world_size: int, device: torch.device) -> DaliValLoader:
    return DaliValLoader(cfg, samples, rank, world_size)
