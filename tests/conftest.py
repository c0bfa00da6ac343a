"""Shared test setup: no network ever, and one tiny synthetic dataset per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# tiny preset models are built fresh per test session (and shared with subprocesses via env)
if "ALIGN4GEN_HOME" not in os.environ:
    import tempfile

    os.environ["ALIGN4GEN_HOME"] = tempfile.mkdtemp(prefix="align4gen-test-home-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny models are overhead-bound (faster on a shared CPU), and a
    subprocess with OMP_NUM_THREADS=1 then computes the same floats bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the built-in synthetic set: 6 H.264 videos, 2 classes, 12 frames, 64x64, seed 0."""
    from stages.common.synth import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, videos=6, classes=2, frames=12, size=64, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block AutoencoderKL (spatial factor 2) saved with save_pretrained, for sampling tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(path)
    return path
