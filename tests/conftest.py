import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from stacklm.config import Config
from stacklm.model import cpu_kernels


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for the whole session, so the tiny tokenizer is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny(tmp_path, cache_dir):
    """A builder of the tiny preset with a private run directory and the shared cache."""

    def make(*overrides: str) -> Config:
        return Config.load("configs/tiny.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                 f"data.cache_dir={cache_dir}", "train.progress=false",
                                                 *overrides])

    return make


@pytest.fixture
def stopped_copy():
    """`copy(run, at, to)`: a copy of run directory `run` at `to`, as if the run had been killed
    right after its step-`at` checkpoint (later checkpoints and the `latest` pointer gone)."""

    def copy(run, at: int, to):
        shutil.copytree(run, to)
        for later in (to / "checkpoints").glob("step_*"):
            if int(later.name.split("_")[1]) > at:
                shutil.rmtree(later)
        (to / "checkpoints" / "latest").unlink()
        return to

    return copy


@pytest.fixture
def torchrun_train():
    """`stacklm train configs/tiny.yaml ITEMS...` under torchrun on `ranks` CPU processes (gloo, one
    thread each); fails the test if the run fails."""

    def run(*items: str, ranks: int = 2) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "stacklm.cli", "train", "configs/tiny.yaml", *items]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["pytorch", "fused"])
def kernels(request):
    """One-token inference steps through PyTorch ops, or through stacklm's fused CPU kernels
    (model/csrc/; see require_cpu_kernels)."""
    if request.param == "pytorch":
        with cpu_kernels.disabled():
            yield request.param
        return
    require_cpu_kernels()
    yield request.param


def require_cpu_kernels() -> None:
    """Load the CPU kernels; fail if they do not build where a compiler and ninja are present,
    skip where they are not (or where STACKLM_CPU_KERNELS=0 turns them off)."""
    if cpu_kernels.load():
        return
    if cpu_kernels.enabled and shutil.which("c++") and is_ninja_available():
        pytest.fail("the CPU kernels did not build, though a C++ compiler and ninja are here")
    pytest.skip("no C++ compiler or ninja here, or STACKLM_CPU_KERNELS=0")
