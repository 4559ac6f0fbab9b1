"""The NVIDIA DALI backend: one pipeline definition, run on the GPU or the CPU.

`data.dali_device: gpu` decodes JPEGs with the `mixed` (nvJPEG) decoder and augments on
the GPU; `cpu` decodes and augments on the CPU (what tests and CI run) and, in a run on a
GPU, has DALI copy each batch to the GPU ahead of the step. Both decode with the same
arguments, so the placement changes speed, not the images. The file lists come
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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from powergrad_train.config.declare import Part, opt
from powergrad_train.data import Backend, TrainLoader, ValLoader, resolve_root, val_backend_name
from powergrad_train.data.files import SkippedFiles
from powergrad_train.data.sampling import SampledEpochs, TrainSampler, sample_seed
from powergrad_train.system.errors import ConfigError, DataError, ImageError, printable

if TYPE_CHECKING:  # torch and DALI load when a pipeline is built (the schema imports this file)
    import torch

    from powergrad_train.config.sections import DataConfig


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch as dali_torch
    except ImportError:
        import torch

        # DALI wheels are built per CUDA major version; name the one that matches this torch.
        extra = "dali-cuda12" if (torch.version.cuda or "").startswith("12.") else "dali"
        raise ConfigError(f"data.backend = dali needs NVIDIA DALI: pip install -e '.[{extra}]' "
                          "(or use data.backend: torchvision)") from None
    return dali, dali_torch


@dataclass(frozen=True)
class Placement:
    decoder: str  # 'mixed' (nvJPEG; the augmentation then runs on the GPU too) or 'cpu'
    gpu_outputs: bool  # DALI hands over batches already on the GPU (a no-op .to() in the trainer)
    device_id: Optional[int]  # the pipeline's GPU; None: a CPU-only pipeline


def placement(cfg: DataConfig, device: torch.device) -> Placement:
    """Where the pipelines of a process on `device` run (data.dali_device; auto = gpu in a run on a GPU)."""
    import torch
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return choose_placement(cfg.dali_device, index, dali_runs_on=_dali_runs_on(index))
    if cfg.dali_device == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("data.dali_device = gpu needs a CUDA GPU; use cpu (or auto) on this machine")
        index = torch.cuda.current_device()  # a CPU process on a GPU machine (--dry-run)
        return choose_placement("gpu", index, dali_runs_on=_dali_runs_on(index))
    return choose_placement("cpu", None, dali_runs_on=False)


def choose_placement(dali_device: str, gpu: Optional[int], dali_runs_on: bool) -> Placement:
    """gpu: the process's GPU (None: a CPU-only run); dali_runs_on: the installed DALI has kernels for it."""
    if gpu is None:
        return Placement("cpu", gpu_outputs=False, device_id=None)
    if dali_device == "cpu":
        # Decoded on the CPU, as the paper's authors ran it; DALI's copy to the GPU (from its pinned
        # buffers, on its own stream, batches ahead) keeps the step from waiting on a pageable copy.
        # A DALI build without kernels for this GPU (hardware.DALI_MIN_CAPABILITY) hands over CPU batches.
        return Placement("cpu", gpu_outputs=dali_runs_on, device_id=gpu if dali_runs_on else None)
    return Placement("mixed", gpu_outputs=True, device_id=gpu)


def _dali_runs_on(index: int) -> bool:
    import torch

    from powergrad_train.system.hardware import dali_runs_on
    return dali_runs_on(tuple(torch.cuda.get_device_capability(index)))


def decoder_args() -> dict:
    """The decoders' pixel-affecting arguments, the same for both placements (DALI 2.4's defaults
    differ between them): `mixed` defaults to nearest-neighbour chroma upsampling, while DALI's
    CPU decoder (libjpeg-turbo) and PIL interpolate ("fancy" upsampling). nvImageCodec applies the
    flag to its hardware JPEG decoder (A100/H100, `hw_decoder_load` of each batch) and its CUDA
    decoder alike, so the load split changes speed only; the fast IDCT stays off in both. An image
    is turned as its EXIF orientation says, as the torchvision backend does (imagefolder.to_rgb,
    where the rest of the one meaning of a file's pixels is written down)."""
    return {"output_type": _dali()[0].types.RGB, "jpeg_fancy_upsampling": True, "use_fast_idct": False,
            "adjust_orientation": True}


def define_pipeline(cfg: DataConfig, files: list[str], labels: list[int], batch_size: int, seed: int, train: bool,
                    where: Placement, checkpoint=None):
    """Decode, crop/resize, flip and normalise, on the GPU ('mixed' decoder) or the CPU; defined, not
    built (`serialize()` describes it without a GPU)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    dali, _ = _dali()
    fn, types = dali.fn, dali.types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=max(1, cfg.workers), device_id=where.device_id,
                         seed=seed % (1 << 31), enable_checkpointing=True, checkpoint=checkpoint)
    with pipe:
        jpegs, targets = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=where.decoder, random_area=[cfg.crop_scale_min, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **decoder_args())
            images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size,
                               interp_type=types.INTERP_LINEAR)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=where.decoder, **decoder_args())
            images = fn.resize(images, resize_shorter=int(cfg.image_size / cfg.crop_pct),
                               interp_type=types.INTERP_CUBIC if cfg.val_interpolation == "bicubic"
                               else types.INTERP_LINEAR)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, crop=(cfg.image_size, cfg.image_size), crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
            mean=[255 * m for m in IMAGENET_DEFAULT_MEAN], std=[255 * s for s in IMAGENET_DEFAULT_STD],
            dtype=types.FLOAT, output_layout="CHW")
        pipe.set_outputs(*((images.gpu(), targets.gpu()) if where.gpu_outputs else (images, targets)))
    return pipe


def _pipeline(cfg: DataConfig, files: list[str], labels: list[int], batch_size: int, seed: int, train: bool,
              where: Placement, checkpoint=None):
    pipe = define_pipeline(cfg, files, labels, batch_size, seed, train, where, checkpoint)
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


def _undecodable(files: list[str], where: Placement) -> list[str]:
    """The files DALI's decoder cannot decode, found one at a time (a failure ends its pipeline,
    so the next pipeline starts after it)."""
    dali, _ = _dali()
    bad, rest = [], list(files)
    while rest:
        pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=where.device_id,
                             prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            encoded, _ = dali.fn.readers.file(files=rest, random_shuffle=False)
            pipe.set_outputs(dali.fn.decoders.image(encoded, device=where.decoder, **decoder_args()))
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


def _read(where: Placement, files: list[str], labels: list[int], batch_size: int, list_start: int, first: int,
          stood_in: set[str], skipped: SkippedFiles, make_iterator, on_end=lambda: None):
    """Batches `first`, `first + 1`, ... of the file list through DALI.

    `make_iterator(files, labels, list_start, stood_in)` gives an iterator over the list from
    batch `list_start` on, whose first batch is `first` (later when it resumes a checkpoint).
    When a batch fails to decode, its files (or those of the batches run ahead) are decoded one
    by one to find the culprits, which `skipped` records; the pass goes on from the first batch
    not yet delivered, with a new pipeline in which they are stood in for (see _with_stand_ins).
    So every other image keeps its batch and every process its number of batches. A failure
    that no file explains is raised as it is. `on_end()` is called when the pass is through.
    """
    found = []  # the files found undecodable by the pass just cut short
    while True:
        # (raises when a batch is left with no file DALI can decode: then none of it is said skipped)
        rest_files, rest_labels, kept = _with_stand_ins(files[list_start * batch_size:],
                                                        labels[list_start * batch_size:], batch_size, stood_in)
        for path in found:
            skipped.add(path, "DALI cannot decode it")
        delivered = first
        try:
            for batch in make_iterator(rest_files, rest_labels, list_start, stood_in):
                images, targets = batch[0]["images"], batch[0]["labels"].squeeze(1).long()
                rows = kept[delivered - list_start]
                if rows is not None:
                    images, targets = images[rows], targets[rows]
                yield images, targets
                delivered += 1
            on_end()
            return
        except RuntimeError:  # what a DALI pipeline raises when an operator fails
            for b in range(delivered, delivered + PREFETCHED + 1):
                candidates = [f for f in files[b * batch_size:(b + 1) * batch_size] if f not in stood_in]
                if found := _undecodable(candidates, where):
                    break
            if not found:
                raise
        stood_in, list_start, first = stood_in | set(found), delivered, delivered


class DaliTrainLoader(SampledEpochs, TrainLoader):
    """This rank's training batches through a per-epoch DALI pipeline. A file that fails to decode
    is left out of its batch (see _read); every other image keeps its batch."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], seed: int, rank: int, world_size: int,
                 where: Placement):
        self.cfg, self.samples, self.seed, self.rank, self.where = cfg, samples, seed, rank, where
        self.sampler = TrainSampler(len(samples), cfg.batch_size, rank, world_size, seed)
        self.num_samples = len(samples)
        self.skipped = SkippedFiles(resolve_root(cfg) / "train", "training")
        self.epoch, self.start_batch = 0, 0
        self._restore = None  # a saved position to resume from, for the next pass
        self._iterator = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def load_state_dict(self, state: Optional[dict]) -> None:
        self._restore = state

    def state_dict(self) -> Optional[dict]:
        """Where the pass under way stands: the batch its file list starts at, the files stood in for
        in that list, and DALI's checkpoint."""
        if self._iterator is None:  # no pass under way: (epoch, start_batch) says it all
            return None
        return {"list_start": self._list_start, "stood_in": sorted(self._stood_in),
                "pipeline": self._iterator.checkpoints()[0]}

    def _pass_ended(self) -> None:
        self._iterator = None

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
                             where=self.where, checkpoint=saved["pipeline"] if saved and not again else None)
            self._list_start, self._stood_in = list_start, stood
            self._iterator = dali_torch.DALIGenericIterator(
                pipe, ["images", "labels"], reader_name="Reader",
                last_batch_policy=dali_torch.LastBatchPolicy.DROP, auto_reset=False)
            return self._iterator

        return _read(self.where, [self.samples[i][0] for i in indices], [self.samples[i][1] for i in indices],
                     self.sampler.local_batch, start, self.start_batch, stood_in, self.skipped, make_iterator,
                     on_end=self._pass_ended)


class DaliValLoader(ValLoader):
    """Every val image once across ranks; the last batch may be short (PARTIAL, no padding). A file
    that fails to decode is left out and said (so the images counted in the result are one fewer)."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], rank: int, world_size: int,
                 where: Placement):
        mine = samples[rank::world_size]
        self.cfg, self.where, self.num_samples = cfg, where, len(samples)
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
        pipe = _pipeline(self.cfg, files, labels, self.batch, seed=0, train=False, where=self.where)
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
            pipe = _pipeline(self.cfg, files, labels, self.batch, seed=0, train=False, where=self.where)
            return dali_torch.DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                                  last_batch_policy=dali_torch.LastBatchPolicy.PARTIAL)

        return _read(self.where, self.files, self.labels, self.batch, 0, 0, self.skipped.earlier | set(self.skipped.found),
                     self.skipped, make_iterator)

    def close(self) -> None:
        self._iterator = None


def check_file_names(samples: list[tuple[str, int]]) -> None:
    """DALI takes its file list as UTF-8 text; a name that is not UTF-8 (held as surrogates) would
    fail deep inside it. The torchvision backend reads such names."""
    for path, _ in samples:
        if not path.isascii():
            try:
                path.encode()
            except UnicodeEncodeError:
                raise DataError(f"{printable(path)}: data.backend = dali cannot read a file name that is not UTF-8; "
                                "rename it, or use data.backend: torchvision") from None


def build_train(cfg: DataConfig, samples, seed: int, rank: int, world_size: int,
                device: torch.device) -> DaliTrainLoader:
    # a gpu request on a machine without CUDA fails here, before any pipeline
    where = placement(cfg, device)
    check_file_names(samples)
    return DaliTrainLoader(cfg, samples, seed, rank, world_size, where)


def build_val(cfg: DataConfig, samples, rank: int, world_size: int, device: torch.device) -> DaliValLoader:
    where = placement(cfg, device)
    check_file_names(samples)
    return DaliValLoader(cfg, samples, rank, world_size, where)


def measure_gpu_memory(cfg: DataConfig, train_samples, val_samples, device: torch.device, world_size: int = 1,
                       batches: int = 3) -> Optional[int]:
    """Bytes of GPU memory one process's DALI pipelines take in a run on `device`: the train pipeline
    and, unless data.val_backend validates with torchvision, the val pipeline, as the trainer builds
    them (memory pools, prefetch queues, decoded and augmented images), measured with
    torch.cuda.mem_get_info after `batches` batches through each; torch's own memory (the batches
    handed over) is not counted. None in a run on the CPU (nothing to measure).

    Built on the side, then closed: DALI keeps freed memory in its pool (until
    nvidia.dali.backend.ReleaseUnusedMemory()), so pipelines built next reuse it rather than add to it."""
    if device.type != "cuda":
        return None
    from powergrad_train.system.hardware import MemoryOutsideTorch
    meter = MemoryOutsideTorch(device)
    loaders = [build_train(cfg, train_samples, 0, 0, world_size, device)]
    if val_backend_name(cfg) == "dali":
        loaders.append(build_val(cfg, val_samples, 0, world_size, device))
    try:
        loaders[0].set_epoch(0)
        for loader in loaders:
            for _, _ in zip(range(batches), loader):
                pass
        return meter.taken()
    finally:
        for loader in loaders:
            loader.close()


@dataclass
class DaliKeys:
    dali_device: str = opt("auto", "where to decode and augment; auto = gpu when CUDA is available",
                           choices=("auto", "gpu", "cpu"))


PART = Part(Backend(build_train, build_val), "NVIDIA DALI, pip install -e '.[dali]'", keys=DaliKeys)
