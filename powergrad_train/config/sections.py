"""The sections of the config that are no single part's: the model, the data pipeline's common keys,
the training loop, checkpoints, and for each kind of part the key that selects it.

The keys a part reads besides these are declared in the part's own file (config/declare.py); the
schema (config/schema.py) adds them to their kind's section here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from powergrad_train.config.declare import opt
from powergrad_train.system.errors import ConfigError

DEMO_ROOT = "builtin:demo"


@dataclass
class ModelConfig:
    name: str = opt("resnet50", "timm model name (e.g. resnet18, seresnet50), or resnet18_nobn: ResNet-18 with every norm layer replaced by identity", fixed=True)
    num_classes: int = opt(1000, "number of classes of the classifier head", ge=1, fixed=True)
    zero_init_last: bool = opt(True, "zero-initialise the last batch-norm scale of each residual block (timm's default); "
                                     "the PGT authors' runs effectively had false", fixed=True)
    sync_bn: bool = opt(False, "convert batch norm to SyncBatchNorm in distributed GPU runs, so statistics cover the global batch")
    compile: bool = opt(False, "torch.compile the model (and the loss with it) for speed; first steps compile. Needs a "
                               "C++ compiler on the CPU, triton and a C compiler on CUDA GPUs (checked at start)")
    init_from: Optional[str] = opt(None, "start from these weights instead of a random init: a state_dict file (timm or "
                                         "torchvision .pth, or a file holding 'state_dict' or 'model') or a "
                                         "powergrad-train checkpoint; the classifier head is re-initialised when its "
                                         "class count differs; not used when resuming", fixed=True, path=True)


@dataclass
class DataConfig:
    root: str = opt(DEMO_ROOT, f"ImageFolder root holding train/ and val/ (~ and a relative path are stored as the "
                               f"absolute path); '{DEMO_ROOT}' generates a small learnable demo set on first use",
                    path=True)
    backend: str = opt("torchvision", "")  # a data_backend (config/registry.py)
    image_size: int = opt(224, "train crop and val crop size in pixels", ge=8, fixed=True)
    crop_pct: float = opt(0.875, "val: resize the shorter side to image_size / crop_pct, then center crop", gt=0.0, le=1.0, fixed=True)
    crop_scale_min: float = opt(0.08, "train: smallest area fraction of the random resized crop (largest is 1)", gt=0.0, le=1.0, fixed=True)
    batch_size: int = opt(256, "GLOBAL train batch size, split evenly over all processes", ge=1, fixed=True)
    val_batch_size: Optional[int] = opt(None, "GLOBAL val batch size; null = batch_size", ge=1)
    val_interpolation: str = opt("bilinear", "val: interpolation of the resize (the paper's runs: bicubic for "
                                             "resnet50/101 and the SE-ResNets, bilinear for resnet18)",
                                 choices=("bilinear", "bicubic"))
    val_backend: str = opt("same", "val pipeline: same = the train backend's; torchvision = PIL resize and center "
                                   "crop in a DataLoader (how the paper's runs evaluated, also when training with DALI)",
                           choices=("same", "torchvision"))
    workers: int = opt(4, "per training process: torchvision loader worker processes (0 = main process), "
                          "or DALI threads (at least 1)", ge=0)

    def val_batch_per_process(self, world_size: int) -> int:
        """The val batch of one process: val_batch_size (or batch_size) split over the processes."""
        val_batch = self.val_batch_size or self.batch_size
        if val_batch % world_size:
            raise ConfigError(f"data.val_batch_size {val_batch} does not split evenly over {world_size} process(es)")
        return val_batch // world_size


@dataclass
class OptimConfig:
    name: str = opt("sgd", "", fixed=True)  # an optimizer
    lr: float = opt(0.1, "peak learning rate (reached at the end of warmup)", gt=0.0, fixed=True)
    weight_decay: float = opt(5e-4, "weight decay (L2 for sgd, decoupled for adamw and lamb); never applied to "
                                    "biases and norm parameters", ge=0.0, fixed=True)


@dataclass
class ScheduleConfig:
    name: str = opt("cosine", "", fixed=True)  # a schedule
    mode: str = opt("per_step", "per_step: the LR changes every optimizer step; authors_per_epoch: the PGT authors' "
                                "code as it ran: one LR per epoch, epoch 1 at t=0 and epoch E>=2 at t=E (t=1 never "
                                "used), warmup inside the decay's count", choices=("per_step", "authors_per_epoch"),
                    fixed=True)
    epochs: int = opt(100, "total epochs trained, warmup and cooldown included", ge=1, fixed=True)
    warmup_epochs: float = opt(5.0, "linear warmup from warmup_lr to optim.lr over this many epochs", ge=0.0, fixed=True)
    warmup_lr: float = opt(1e-4, "LR at the first step of warmup", ge=0.0, fixed=True)
    min_lr: float = opt(0.0, "cosine, linear: LR at the end of the decay; all: LR during cooldown", ge=0.0, fixed=True)
    cooldown_epochs: int = opt(10, "final epochs held at min_lr", ge=0, fixed=True)


@dataclass
class LossConfig:
    name: str = opt("cross_entropy", "", fixed=True)  # an objective


@dataclass
class GradClipConfig:
    mode: str = opt("none", "gradient stage: none | value (GC, clip each element) | norm (global L2 norm) | agc (adaptive, head excluded)", choices=("none", "value", "norm", "agc"), fixed=True)
    value: Optional[float] = opt(None, "threshold: max |g| for value, max norm for norm, clipping factor lambda for agc", gt=0.0, fixed=True)


@dataclass
class BatchTransformConfig:
    name: str = opt("none", "", fixed=True)  # a batch_transform


@dataclass
class WeightAverageConfig:
    name: str = opt("none", "", fixed=True)  # a weight_average


@dataclass
class CheckpointConfig:
    keep_last: int = opt(2, "numbered epoch checkpoints kept besides last.pt and best.pt", ge=0)
    every_steps: int = opt(0, "also write last.pt every this many optimizer steps inside an epoch (0 = only at epoch ends)", ge=0)


@dataclass
class TrainConfig:
    accumulate_steps: int = opt(1, "micro-batches per optimizer step (gradient accumulation)", ge=1)
    log_every_steps: int = opt(50, "progress/TensorBoard interval in optimizer steps (metrics are read from the device only then)", ge=1)
    max_nonfinite_steps: int = opt(20, "stop the run when this many steps in a row had non-finite gradients (such steps are skipped completely)", ge=1)


@dataclass
class LogConfig:
    outputs: list[str] = opt(["console", "csv", "tensorboard"], "")  # outputs


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_clip: GradClipConfig = field(default_factory=GradClipConfig)
    batch_transform: BatchTransformConfig = field(default_factory=BatchTransformConfig)
    weight_average: WeightAverageConfig = field(default_factory=WeightAverageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    amp: str = opt("off", "mixed precision: off | fp16 (GradScaler, CUDA only) | bf16", choices=("off", "fp16", "bf16"))
    channels_last: bool = opt(False, "channels_last memory format for model and images")
    tf32: bool = opt(True, "Ampere and newer GPUs: float32 convolutions and matmuls use TF32 tensor cores (torch's "
                           "own default does so for convolutions only); false = full float32. No effect on older "
                           "GPUs, the CPU, or the ops autocast runs in fp16/bf16")
    seed: int = opt(0, "seed for init, data order and augmentation: same seed, same run", ge=0, lt=2**32, fixed=True)

