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

from typing import Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from powergrad_train.config import DataConfig
from powergrad_train.data import Backend, TrainLoader, ValLoader
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


def _batches(iterator, on_end=lambda: None):
    for batch in iterator:
        yield batch[0]["images"], batch[0]["labels"].squeeze(1).long()
    on_end()


class DaliTrainLoader(TrainLoader):
    """This rank's training batches through a per-epoch DALI pipeline."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], seed: int, rank: int, world_size: int):
        self.cfg, self.samples, self.seed, self.rank = cfg, samples, seed, rank
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
                         checkpoint=saved["pipeline"] if saved else None)
        self._iterator = dali_torch.DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader",
            last_batch_policy=dali_torch.LastBatchPolicy.DROP, auto_reset=False)
        return _batches(self._iterator, on_end=self._pass_ended)


class DaliValLoader(ValLoader):
    """Every val image once across ranks; the last batch may be short (PARTIAL, no padding)."""

    def __init__(self, cfg: DataConfig, samples: list[tuple[str, int]], rank: int, world_size: int):
        _, dali_torch = _dali()
        mine = samples[rank::world_size]
        self.num_samples = len(samples)
        batch = cfg.val_batch_per_process(world_size)
        pipe = _pipeline(cfg, [p for p, _ in mine], [label for _, label in mine], batch, seed=0, train=False)
        self._iterator = dali_torch.DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader",
            last_batch_policy=dali_torch.LastBatchPolicy.PARTIAL, auto_reset=True)

    def __iter__(self):
        return _batches(self._iterator)

    def close(self) -> None:
        self._iterator = None


def build_train(cfg: DataConfig, samples, seed: int, rank: int, world_size: int,
                device: torch.device) -> DaliTrainLoader:
    placement(cfg)  # a gpu request on a machine without CUDA fails here, before any pipeline
    return DaliTrainLoader(cfg, samples, seed, rank, world_size)


def build_val(cfg: DataConfig, samples, rank: int, world_size: int, device: torch.device) -> DaliValLoader:
    return DaliValLoader(cfg, samples, rank, world_size)


BACKEND = Backend(build_train, build_val)
