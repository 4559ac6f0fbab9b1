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
from typing import Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from powergrad_train.config import DataConfig
from powergrad_train.data import Backend, TrainLoader, ValLoader, val_backend_name
from powergrad_train.data.sampling import TrainSampler, sample_seed
from powergrad_train.errors import ConfigError

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


@dataclass(frozen=True)
class Placement:
    decoder: str  # 'mixed' (nvJPEG; the augmentation then runs on the GPU too) or 'cpu'
    gpu_outputs: bool  # DALI hands over batches already on the GPU (a no-op .to() in the trainer)
    device_id: Optional[int]  # the pipeline's GPU; None: a CPU-only pipeline


def placement(cfg: DataConfig, device: torch.device) -> Placement:
    """Where the pipelines of a process on `device` run (data.dali_device; auto = gpu in a run on a GPU)."""
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
    from powergrad_train.hardware import dali_runs_on
    return dali_runs_on(tuple(torch.cuda.get_device_capability(index)))


def decoder_args() -> dict:
    """The decoders' pixel-affecting arguments, the same for both placements (DALI 2.4's defaults
    differ between them): `mixed` defaults to nearest-neighbour chroma upsampling, while DALI's
    CPU decoder (libjpeg-turbo) and PIL interpolate ("fancy" upsampling). nvImageCodec applies the
    flag to its hardware JPEG decoder (A100/H100, `hw_decoder_load` of each batch) and its CUDA
    decoder alike, so the load split changes speed only; the fast IDCT stays off in both."""
    return {"output_type": _dali()[0].types.RGB, "jpeg_fancy_upsampling": True, "use_fast_idct": False}


def define_pipeline(cfg: DataConfig, files: list[str], labels: list[int], batch_size: int, seed: int, train: bool,
                    where: Placement, checkpoint=None):
    """Decode, crop/resize, flip and normalise, on the GPU ('mixed' decoder) or the CPU; defined, not
    built (`serialize()` describes it without a GPU)."""
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
            mean=MEAN, std=STD, dtype=types.FLOAT, output_layout="CHW")
        pipe.set_outputs(*((images.gpu(), targets.gpu()) if where.gpu_outputs else (images, targets)))
    return pipe


def _pipeline(cfg: DataConfig, files: list[str], labels: list[int], batch_size: int, seed: int, train: bool,
              where: Placement, checkpoint=None):
    pipe = define_pipeline(cfg, files, labels, batch_size, seed, train, where, checkpoint)
    pipe.build()
    return pipe


def _batches(iterator, on_end=lambda: None):
    for batch in iterator:
        yield batch[0]["images"], batch[0]["labels"].squeeze(1).long()
    on_end()


class DaliTrainLoader(TrainLoader):
    """This rank's training batches through a per-epoch DALI pipeline."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], seed: int, rank: int, world_size: int,
                 where: Placement):
        self.cfg, self.samples, self.seed, self.rank, self.where = cfg, samples, seed, rank, where
        self.sampler = TrainSampler(len(samples), cfg.batch_size, rank, world_size, seed)
        self.batches_per_epoch, self.num_samples = self.sampler.batches_per_epoch, len(samples)
        self.epoch, self.start_batch = 0, 0
        self._restore = None  # a saved position to resume from, for the next pass
        self._iterator = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def load_state_dict(self, state: Optional[dict]) -> None:
        self._restore = state

    def state_dict(self) -> Optional[dict]:
        """Where the pass under way stands: the batch its file list starts at, and DALI's checkpoint."""
        if self._iterator is None:  # no pass under way: (epoch, start_batch) says it all
            return None
        return {"list_start": self._list_start, "pipeline": self._iterator.checkpoints()[0]}

    def _pass_ended(self) -> None:
        self._iterator = None

    def close(self) -> None:
        self._iterator = None  # releases the pipeline and its threads

    def __iter__(self):
        _, dali_torch = _dali()
        saved, self._restore = self._restore, None
        self._list_start = saved["list_start"] if saved else self.start_batch
        self.sampler.set_epoch(self.epoch, self._list_start)
        indices = [i for i, _ in self.sampler]
        self._iterator = None  # release the previous epoch's pipeline first
        pipe = _pipeline(self.cfg, [self.samples[i][0] for i in indices], [self.samples[i][1] for i in indices],
                         self.sampler.local_batch, sample_seed(self.seed, self.epoch, self.rank), train=True,
                         where=self.where, checkpoint=saved["pipeline"] if saved else None)
        self._iterator = dali_torch.DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader",
            last_batch_policy=dali_torch.LastBatchPolicy.DROP, auto_reset=False)
        return _batches(self._iterator, on_end=self._pass_ended)


class DaliValLoader(ValLoader):
    """Every val image once across ranks; the last batch may be short (PARTIAL, no padding)."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], rank: int, world_size: int,
                 where: Placement):
        _, dali_torch = _dali()
        mine = samples[rank::world_size]
        self.num_samples = len(samples)
        batch = cfg.val_batch_per_process(world_size)
        pipe = _pipeline(cfg, [p for p, _ in mine], [label for _, label in mine], batch, seed=0, train=False,
                         where=where)
        self._iterator = dali_torch.DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader",
            last_batch_policy=dali_torch.LastBatchPolicy.PARTIAL, auto_reset=True)

    def __iter__(self):
        return _batches(self._iterator)

    def close(self) -> None:
        self._iterator = None


def build_train(cfg: DataConfig, samples, seed: int, rank: int, world_size: int,
                device: torch.device) -> DaliTrainLoader:
    # a gpu request on a machine without CUDA fails here, before any pipeline
    return DaliTrainLoader(cfg, samples, seed, rank, world_size, placement(cfg, device))


def build_val(cfg: DataConfig, samples, rank: int, world_size: int, device: torch.device) -> DaliValLoader:
    return DaliValLoader(cfg, samples, rank, world_size, placement(cfg, device))


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
    from powergrad_train.hardware import MemoryOutsideTorch
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


BACKEND = Backend(build_train, build_val)
