"""low_memory text encoding: T5 alone, then the CLIPs, each released after its turn; same results as batched."""

import numpy as np
import pytest

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.models.prompt_encoder import PromptEncoder


@pytest.fixture(scope="module")
def pipes(tiny_pipeline):
    batched = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")
    staged = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", low_memory=True)
    return batched, staged


def test_low_memory_loads_no_text_encoder_up_front(pipes):
    assert pipes[1].prompt_encoder is None and pipes[1].transformer is None


def test_sequential_text_encoding_equals_batched_exactly(pipes, monkeypatch):
    batched, staged = pipes
    seen = []
    clip = PromptEncoder._clip

    def spy(self, index, prompts, skips):
        # T5 already ran and was released; the other CLIP is still there (both share a stage)
        seen.append((index, self.text_encoder_3 is None, self.text_encoder is not None))
        return clip(self, index, prompts, skips)

    monkeypatch.setattr(PromptEncoder, "_clip", spy)
    kw = dict(negative_prompt="blurry", max_sequence_length=32)
    got = staged.encode_prompt(["a heron", "a lighthouse at dusk"], **kw)
    assert seen == [(0, True, True), (1, True, True)]
    seen.clear()
    want = batched.encode_prompt(["a heron", "a lighthouse at dusk"], **kw)
    assert seen == [(0, False, True), (1, False, True)]
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and np.array_equal(np.array(a), np.array(b))
    assert staged.prompt_encoder is None  # nothing kept after the stage
