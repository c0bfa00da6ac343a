"""`pipeline sample`: a trained model's checkpoint -> videos (mp4, GIF grid, npz for evaluation)."""

from stages.sample.config import SampleConfig

__all__ = ["SampleConfig", "run_sample"]


def run_sample(cfg: SampleConfig):  # noqa: ANN201 - re-exported lazily to keep import light
    """Generate `cfg.num` videos; see `stages.sample.run.run_sample`."""
    from stages.sample.run import run_sample as _run

    return _run(cfg)
