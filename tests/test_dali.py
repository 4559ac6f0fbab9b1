"""The DALI backend, run for real on the CPU (data.dali_device: cpu)."""

import importlib.metadata
import shutil
import signal
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.data import build_train_loader, build_val_loader
from powergrad_train.data import dali as dali_backend
from powergrad_train.data.dali import Placement, choose_placement
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.data.files import list_split
from powergrad_train.system.errors import ConfigError
from powergrad_train.training import checkpoint
from tests.conftest import REPO, assert_same_weights, load_weights, tiny_overrides
from tests.test_data import IMAGE_FORMATS, jpeg_without_tables, write_image_formats
from tests.test_fault_tolerance import start, wait_for


def dali_cfg(root, *extra):
    return build_config(None, [f"data.root={root}", "data.backend=dali", "data.dali_device=cpu", "data.image_size=16",
                               "data.batch_size=8", "data.workers=1", *extra]).data


@pytest.fixture(scope="module")
def one_per_class(module_tmp):
    """26 classes of one image each, so a label names its image."""
    root = module_tmp / "unique"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(26):
            (root / split / f"c{c:02d}").mkdir(parents=True)
            pixels = rng.integers(0, 256, (24 + c, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"c{c:02d}" / "img.jpg")
    return root


def epoch_labels(loader, epoch):
    loader.set_epoch(epoch)
    batches = [y.tolist() for _, y in loader]
    assert len(batches) == loader.batches_per_epoch
    return batches


def test_shapes_dtypes_and_imagefolder_label_order(tiny_root):
    loader, classes = build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader])
    assert images[0].shape == (8, 3, 16, 16) and images[0].dtype == torch.float32
    assert labels[0].dtype == torch.int64
    reference = ImageFolder(str(tiny_root / "val"))
    assert classes == reference.classes
    assert torch.cat(labels).tolist() == reference.targets  # 60 images: the last batch of 4 is not padded


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_length_and_coverage_over_shards(one_per_class, world):
    cfg = dali_cfg(one_per_class)
    loaders = [build_train_loader(cfg, seed=0, rank=r, world_size=world)[0] for r in range(world)]
    seen = {}
    for epoch in (0, 1):
        per_rank = [epoch_labels(loader, epoch) for loader in loaders]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == 3  # 26 // 8 global batches
        flat = [label for batches in per_rank for batch in batches for label in batch]
        assert len(flat) == 24 == len(set(flat))  # no sample twice, 2 of 26 left for this epoch
        seen[epoch] = [b for batches in per_rank for b in batches]
    assert seen[0] != seen[1]  # reshuffled globally


def test_same_seed_same_batches_and_other_seed_differs(tiny_root):
    def first_batch(seed):
        loader, _ = build_train_loader(dali_cfg(tiny_root), seed=seed, rank=0, world_size=1)
        loader.set_epoch(0)
        images, labels = next(iter(loader))
        return images.clone(), labels.clone()
    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_resume_inside_an_epoch_gives_the_same_batches(tiny_root):
    cfg = dali_cfg(tiny_root)
    loader, _ = build_train_loader(cfg, seed=3, rank=0, world_size=1)
    loader.set_epoch(1)
    batches, state = [], None
    for i, (x, y) in enumerate(loader):
        batches.append((x.clone(), y.clone()))
        if i == 6:
            state = loader.state_dict()
    resumed, _ = build_train_loader(cfg, seed=3, rank=0, world_size=1)
    resumed.set_epoch(1, start_batch=7)
    resumed.load_state_dict(state)
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == len(batches) - 7
    for (x, y), (rx, ry) in zip(batches[7:], rest):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_val_images_match_the_torchvision_backend(tiny_root):
    torch_loader, _ = build_val_loader(dali_cfg(tiny_root, "data.backend=torchvision"), rank=0, world_size=1)
    dali_loader, _ = build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)
    for (a, ya), (b, yb) in zip(torch_loader, dali_loader):
        assert torch.equal(ya, yb)
        # on average within a third of an 8-bit level (1 / 255 / std ~ 0.0175 after normalisation), at most
        # about three levels (the two resizes round differently at some edges)
        assert (a - b).abs().max() < 0.05 and (a - b).abs().mean() < 0.005


def test_corrupt_files_are_skipped_and_listed(tmp_path, capsys):
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    folder = tmp_path / "val" / "circle"
    good = next(folder.glob("*.jpg")).read_bytes()
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "png_named.jpg", format="PNG")
    loader, _ = build_val_loader(dali_cfg(tmp_path), rank=0, world_size=1)
    assert sum(len(y) for _, y in loader) == 11  # 10 good JPEGs + the PNG
    out = capsys.readouterr().out
    assert "skipped 3 unusable file(s)" in out
    listed = out.split("list in ")[1].strip()
    assert sorted(open(listed).read().splitlines()) == sorted(f"{folder / n}  (not an image, or damaged)" for n in
                                                              ("empty.jpg", "garbage.jpg", "truncated.jpg"))


def test_every_format_the_scan_keeps_is_decoded(tmp_path, capsys):
    """BMP, TIFF, WebP, PNM and a JPEG with fill bytes before a marker: kept by the scan, read by DALI
    in both splits, with the same pixels as the torchvision backend."""
    write_image_formats(tmp_path)
    for split in ("train", "val"):
        samples = list_split(tmp_path, split, verbose=True).samples
        assert len(samples) == 2 * len(IMAGE_FORMATS)
    assert "skipped" not in capsys.readouterr().out
    train, _ = build_train_loader(dali_cfg(tmp_path, "data.batch_size=2"), seed=0, rank=0, world_size=1)
    assert sum(len(y) for _, y in train) == 2 * len(IMAGE_FORMATS)
    dali_loader, _ = build_val_loader(dali_cfg(tmp_path), rank=0, world_size=1)
    torch_loader, _ = build_val_loader(dali_cfg(tmp_path, "data.backend=torchvision"), rank=0, world_size=1)
    for (a, ya), (b, yb) in zip(torch_loader, dali_loader):
        assert torch.equal(ya, yb)
        assert (a - b).abs().mean() < 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the gpu placement is valid here")
def test_gpu_placement_without_cuda_is_a_clear_error(tiny_root):
    with pytest.raises(ConfigError, match="data.dali_device = gpu needs a CUDA GPU"):
        build_train_loader(dali_cfg(tiny_root, "data.dali_device=gpu"), seed=0, rank=0, world_size=1)


def test_missing_dali_is_a_clear_error(tiny_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ConfigError, match=r"needs NVIDIA DALI: pip install -e '\.\[dali\]'"):
        build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)


DALI_RUN = {"data.backend": "dali", "data.dali_device": "cpu", "data.workers": 1}


def test_training_through_dali_and_exact_resume_after_sigterm(tiny_root, tmp_path):
    overrides = tiny_overrides(tiny_root, **DALI_RUN, **{"data.batch_size": 8, "train.log_every_steps": 10})
    straight = tmp_path / "straight"
    main(["--config", "smoke.yaml", "--output", str(straight), *overrides])
    run_dir = tmp_path / "preempted"
    proc = start(run_dir, [*overrides, "--set=checkpoint.every_steps=5"])
    wait_for(run_dir / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    state = checkpoint.load(run_dir / "last.pt")
    assert state["train_state"]["batch_in_epoch"] > 0 and state["data"][0]["pipeline"]  # DALI's own position was saved
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *overrides])
    assert_same_weights(load_weights(straight / "last.pt"), load_weights(run_dir / "last.pt"))
    shutil.rmtree(straight)


def test_dali_training_can_validate_the_way_the_paper_did(tiny_root):
    """val_backend torchvision: PIL resize and center crop, whatever the train backend."""
    from powergrad_train.data.imagefolder import TorchValLoader
    cfg = dali_cfg(tiny_root, "data.val_backend=torchvision", "data.val_interpolation=bicubic")
    loader, _ = build_val_loader(cfg, rank=0, world_size=1)
    assert isinstance(loader, TorchValLoader)
    reference, _ = build_val_loader(dali_cfg(tiny_root, "data.backend=torchvision", "data.val_interpolation=bicubic"),
                                    rank=0, world_size=1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(loader, reference))
    dali_bicubic, _ = build_val_loader(dali_cfg(tiny_root, "data.val_interpolation=bicubic"), rank=0, world_size=1)
    dali_bilinear, _ = build_val_loader(dali_cfg(tiny_root), rank=0, world_size=1)
    assert not torch.equal(next(iter(dali_bicubic))[0], next(iter(dali_bilinear))[0])  # DALI honours it too


# ---------------------------------------------------------------- the GPU placements, read from the graph on the CPU

def _graph_schema():
    """The part of DALI's own dali.proto (PipelineDef, OpDef, Argument, InputOutput) that these tests read:
    DALI serializes a defined pipeline without a GPU, but ships no Python module for its schema."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="dali_graph.proto", package="dali_graph", syntax="proto2")

    def message(name, fields):  # fields: number -> (name, type, repeated, message type)
        m = file.message_type.add(name=name)
        for number, (field, kind, repeated, of) in fields.items():
            f = m.field.add(name=field, number=number, type=kind,
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if of:
                f.type_name = f".dali_graph.{of}"
    message("Argument", {1: ("name", F.TYPE_STRING, False, None), 3: ("floats", F.TYPE_FLOAT, True, None),
                         4: ("ints", F.TYPE_INT64, True, None), 5: ("strings", F.TYPE_STRING, True, None),
                         6: ("bools", F.TYPE_BOOL, True, None), 7: ("extra_args", F.TYPE_MESSAGE, True, "Argument")})
    message("InputOutput", {1: ("name", F.TYPE_STRING, False, None), 2: ("device", F.TYPE_STRING, False, None)})
    message("OpDef", {1: ("name", F.TYPE_STRING, False, None), 4: ("args", F.TYPE_MESSAGE, True, "Argument")})
    message("PipelineDef", {5: ("op", F.TYPE_MESSAGE, True, "OpDef"),
                            7: ("pipe_outputs", F.TYPE_MESSAGE, True, "InputOutput")})
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("dali_graph.PipelineDef"))


def _value(arg):
    values = list(arg.bools) or list(arg.ints) or list(arg.floats) or list(arg.strings)
    return values[0] if len(values) == 1 else [_value(a) for a in arg.extra_args]


def dali_graph(cfg, train, where):
    """(ops as (operator, {argument: value}), output devices) of the pipeline `where` describes, as DALI
    serializes it: defined on this machine, never built, so GPU placements read the same as CPU ones."""
    pipe = dali_backend.define_pipeline(cfg, ["a.jpg", "b.jpg"], [0, 1], 2, seed=0, train=train, where=where)
    graph = _graph_schema().FromString(pipe.serialize())
    ops = [(op.name, {a.name: _value(a) for a in op.args if not a.name.startswith("_")}) for op in graph.op]
    return ops, [out.device for out in graph.pipe_outputs]


GRAPH = Placement("mixed", gpu_outputs=True, device_id=None)  # device_id None: serializable without a GPU
CPU_ONLY = Placement("cpu", gpu_outputs=False, device_id=None)


@pytest.mark.parametrize("train", [True, False])
def test_gpu_decoding_asks_for_the_cpu_decoders_chroma_upsampling(tiny_root, train):
    """nvJPEG's default (nearest-neighbour chroma) would make GPU images differ from DALI's CPU decoder and
    PIL; the GPU pipeline is the CPU one with only the placement changed."""
    cfg = dali_cfg(tiny_root)
    gpu_ops, gpu_outputs = dali_graph(cfg, train, GRAPH)
    cpu_ops, cpu_outputs = dali_graph(cfg, train, CPU_ONLY)
    name, args = gpu_ops[1]
    assert name == ("decoders__ImageRandomCrop" if train else "decoders__Image") and args["device"] == "mixed"
    assert args["jpeg_fancy_upsampling"] is True and args["use_fast_idct"] is False
    assert [n for n, _ in gpu_ops] == [n for n, _ in cpu_ops]
    for (_, gpu_args), (_, cpu_args) in zip(gpu_ops, cpu_ops):
        assert {k: v for k, v in gpu_args.items() if k != "device"} == {k: v for k, v in cpu_args.items()
                                                                         if k != "device"}
    assert {name: a["device"] for name, a in gpu_ops if name in ("Resize", "CropMirrorNormalize")} == \
        {"Resize": "gpu", "CropMirrorNormalize": "gpu"}  # augmented on the GPU too
    assert gpu_outputs == ["gpu", "gpu"] and cpu_outputs == ["cpu", "cpu"]


@pytest.mark.parametrize("train", [True, False])
def test_cpu_decoding_in_a_gpu_run_hands_over_batches_on_the_gpu(tiny_root, train):
    """dali_device: cpu on a CUDA machine (how the paper's authors ran): every operator on the CPU, and DALI
    copies the batch to the GPU itself, so the trainer's .to(device) has nothing left to copy."""
    ops, outputs = dali_graph(dali_cfg(tiny_root), train, Placement("cpu", gpu_outputs=True, device_id=None))
    assert {args["device"] for _, args in ops} == {"cpu"}
    assert outputs == ["gpu", "gpu"]


@pytest.mark.parametrize("dali_device,gpu,dali_runs_on,expected", [
    ("cpu", None, False, CPU_ONLY), ("auto", None, False, CPU_ONLY),  # a CPU-only run: as before
    ("cpu", 1, True, Placement("cpu", gpu_outputs=True, device_id=1)),
    ("cpu", 1, False, CPU_ONLY),  # a DALI build without kernels for this GPU (a V100 under DALI's CUDA 13 wheel)
    ("gpu", 1, True, Placement("mixed", gpu_outputs=True, device_id=1)),
    ("auto", 0, True, Placement("mixed", gpu_outputs=True, device_id=0)),
])
def test_where_the_pipelines_run(dali_device, gpu, dali_runs_on, expected):
    assert choose_placement(dali_device, gpu, dali_runs_on) == expected


def test_a_cpu_process_gets_a_cpu_only_pipeline(tiny_root):
    for dali_device in ("cpu", "auto") if not torch.cuda.is_available() else ("cpu",):
        assert dali_backend.placement(dali_cfg(tiny_root, f"data.dali_device={dali_device}"),
                                      torch.device("cpu")) == CPU_ONLY


def test_the_gpu_checks_install_unpacks_wheels_into_site_packages_and_keeps_what_is_there(tmp_path, monkeypatch):
    """gpu_check/gpu_check_install.py, for a GPU machine without network: a wheel that brings its own
    nvidia/__init__.py (as nvimgcodec's does) must not replace the one the machine's packages use."""
    monkeypatch.syspath_prepend(str(REPO / "gpu_check"))
    from gpu_check_install import extract_wheel
    wheel = tmp_path / "fake_codec_cu13-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("nvidia/__init__.py", "# the wheel's\n")
        zf.writestr("nvidia/fake_codec/__init__.py", "VERSION = 1\n")
        zf.writestr("fake_codec_cu13-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-codec-cu13\n"
                                                               "Version: 1.0\n")
        zf.writestr("fake_codec_cu13-1.0.data/platlib/fake_codec_native.py", "")
        zf.writestr("fake_codec_cu13-1.0.data/scripts/fake-tool", "#!/bin/sh\n")
    site = tmp_path / "site-packages"
    (site / "nvidia").mkdir(parents=True)
    (site / "nvidia" / "__init__.py").write_text("# the machine's\n")
    assert extract_wheel(wheel, site) == 3
    assert (site / "nvidia" / "__init__.py").read_text() == "# the machine's\n"
    assert (site / "nvidia" / "fake_codec" / "__init__.py").exists() and (site / "fake_codec_native.py").exists()
    assert not list(site.rglob("fake-tool")) and not list(site.rglob("*.partial"))
    assert [d.version for d in importlib.metadata.distributions(path=[str(site)])] == ["1.0"]
    assert extract_wheel(wheel, site) == 0  # a second run changes nothing


def test_the_gpu_checks_jpeg_folder_is_written_once_and_whole(tmp_path, monkeypatch):
    """scripts/make_jpeg_folder.py: photo-sized JPEGs of the demo classes, the same files for the same
    arguments, a finished folder reused, another one never written into."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from make_jpeg_folder import make_folder
    root = make_folder(tmp_path / "jpegs", train=1, val=1, size=(50, 40), workers=1)
    split = list_split(root, "train", verbose=False)
    assert len(split.classes) == 10 and len(split.samples) == 10
    with Image.open(split.samples[0][0]) as img:
        assert img.format == "JPEG" and img.size == (50, 40)
    again = make_folder(tmp_path / "again", train=1, val=1, size=(50, 40), workers=1)
    assert all((root / f.relative_to(again)).read_bytes() == f.read_bytes() for f in again.rglob("*.jpg"))
    stamp = (root / "COMPLETE").stat().st_mtime_ns
    assert make_folder(root, train=1, val=1, size=(50, 40)) == root and (root / "COMPLETE").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="exists and is not a folder written with these settings"):
        make_folder(root, train=2, val=1, size=(50, 40))


def test_a_file_dali_cannot_decode_is_named_left_out_of_its_batch_and_resumable(one_per_class, tmp_path, capsys):
    """One image per class, so a label names its image. The bad file passes the listing's check
    (its markers parse) and fails in DALI's decoder."""
    shutil.copytree(one_per_class, tmp_path / "data")
    clean, _ = build_train_loader(dali_cfg(one_per_class), seed=0, rank=0, world_size=1)
    loader, _ = build_train_loader(dali_cfg(tmp_path / "data"), seed=0, rank=0, world_size=1)
    order = loader.sampler.epoch_order()
    victim = loader.samples[order[9]][0]  # the second image of the second batch
    open(victim, "wb").write(jpeg_without_tables())
    expected = epoch_labels(clean, 0)
    loader.set_epoch(0)
    batches, state = [], None
    for i, (x, y) in enumerate(loader):
        batches.append((x.clone(), y.clone()))
        if i == 1:
            state = loader.state_dict()
    assert [y.tolist() for _, y in batches] == [expected[0], expected[1][:1] + expected[1][2:], expected[2]]
    assert loader.skipped.found == [victim]
    (line,) = [line for line in capsys.readouterr().out.splitlines() if victim in line]
    assert line.startswith(f"data: cannot read {victim} (DALI cannot decode it); training goes on without it")
    resumed, _ = build_train_loader(dali_cfg(tmp_path / "data"), seed=0, rank=0, world_size=1)
    resumed.set_epoch(0, start_batch=2)
    resumed.load_state_dict(state)  # taken from the pipeline started again after the bad file
    (x, y), = list(resumed)
    assert torch.equal(x, batches[2][0]) and torch.equal(y, batches[2][1])
    assert epoch_labels(loader, 1) == [[label for label in batch if label != expected[1][1]]
                                       for batch in epoch_labels(clean, 1)]  # known from then on


def test_a_val_file_dali_cannot_decode_is_left_out_and_said(tiny_root, tmp_path, capsys):
    shutil.copytree(tiny_root / "val", tmp_path / "data" / "val")
    shutil.copytree(tiny_root / "val", tmp_path / "data" / "train")
    victim = sorted((tmp_path / "data" / "val" / "dots").iterdir())[2]
    victim.write_bytes(jpeg_without_tables())
    loader, _ = build_val_loader(dali_cfg(tmp_path / "data"), rank=0, world_size=1)
    reference = ImageFolder(str(tmp_path / "data" / "val"))  # every file, as listed
    left_out = [path for path, _ in reference.samples].index(str(victim))
    for _ in range(2):  # found in the first validation, known in the second
        labels = [label for _, y in loader for label in y.tolist()]
        assert labels == [t for i, t in enumerate(reference.targets) if i != left_out]
    assert [line for line in capsys.readouterr().out.splitlines() if str(victim) in line][0].startswith(
        f"data: cannot read {victim} (DALI cannot decode it); validation goes on without it")


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_file_name_that_is_not_utf8_is_one_line_with_dali(tmp_path, capsys, split):
    """DALI takes its file list as UTF-8 text: such a name is refused before any pipeline, naming it
    (the torchvision backend reads it)."""
    import os
    root = tmp_path / "data"
    write_demo_dataset(root, {"train": 2, "val": 1})
    folder = os.fsencode(root / split / "ring")
    first = sorted(os.listdir(folder))[0]
    os.rename(folder + b"/" + first, folder + b"/\xff" + first)
    args = ["--config", "smoke.yaml", "--dry-run", *tiny_overrides(root, **{"data.batch_size": 4})]
    main(args)  # torchvision
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*args, "--set", "data.backend=dali"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {root}/{split}/ring/\\xff{os.fsdecode(first)}: data.backend = dali cannot read a file name that "
        "is not UTF-8; rename it, or use data.backend: torchvision"]
