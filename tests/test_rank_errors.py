"""Under torchrun, a user error is one line whichever process found it, and the others end quietly."""

import shutil

from powergrad_train.config.build import build_config
from powergrad_train.data.files import list_split
from powergrad_train.data.sampling import TrainSampler
from tests.conftest import tiny_overrides
from tests.test_data import jpeg_without_tables
from tests.test_fault_tolerance import start


def test_an_error_found_by_rank_1_is_one_line_and_no_process_prints_a_traceback(tiny_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    overrides = tiny_overrides(data, **{"data.batch_size": 4, "model.name": "resnet18_nobn", "schedule.epochs": 1})
    seed = build_config("smoke.yaml", [o.removeprefix("--set=") for o in overrides]).seed
    samples = list_split(data, "train", verbose=False).samples
    sampler = TrainSampler(len(samples), 4, rank=1, world_size=2, seed=seed)
    share = [samples[i][0] for i, _ in sampler]
    for path in share[:2]:  # rank 1's first batch: files that pass the listing's check but cannot be decoded
        open(path, "wb").write(jpeg_without_tables())
    proc = start(tmp_path / "run", overrides, nproc=2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {share[0]}: cannot read image (") and "every other image of its batch" in line
    # torch prefixes a process's traceback with its rank; torchrun's own summary (its exit) is not ours
    assert "[rank0]" not in err and "[rank1]" not in err, err[-3000:]
