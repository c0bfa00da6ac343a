"""The tiny WanPipeline preset: real diffusers/transformers classes, built locally, loadable by WanPipeline."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common.presets import _tiny_wan_tokenizer, tiny_wan_pipeline


def test_tokenizer_covers_captions_and_spells_unknown_words():
    tok = _tiny_wan_tokenizer()
    ids = tok(["a red circle drifting left"], padding="max_length", max_length=10)["input_ids"][0]
    assert ids[5] == tok.eos_token_id and ids[6:] == [tok.pad_token_id] * 4
    assert tok.unk_token_id not in ids
    spelled = tok(["zebra"])["input_ids"][0]  # not in the word list: letter pieces, no <unk>
    assert len(spelled) == 6 and tok.unk_token_id not in spelled
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle drifting left"


@pytest.mark.slow
def test_tiny_wan_pipeline_loads_and_generates(tmp_path):
    from diffusers import WanPipeline

    folder = tiny_wan_pipeline(tmp_path)
    assert tiny_wan_pipeline(tmp_path) == folder  # cached: the second call builds nothing
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a red circle drifting left", num_frames=5, height=16, width=16,
        num_inference_steps=2, output_type="np", max_sequence_length=8,
    )  # fmt: skip
    assert out.frames.shape == (1, 5, 16, 16, 3)
    assert np.isfinite(out.frames).all()
