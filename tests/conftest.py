import pytest
import torch

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["pytorch", "fused"])
def kernels(request):
    """One-token inference steps through PyTorch ops, or through stacklm's fused CPU kernels
    (model/csrc/; skipped where they do not build)."""
    if request.param == "pytorch":
        with cpu_kernels.disabled():
            yield request.param
        return
    if not cpu_kernels.load():
        pytest.skip("the CPU kernels did not build here")
    yield request.param
