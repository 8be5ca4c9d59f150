"""Every encoder-decoder family we know is paged and equal to `generate`, or on the fallback and equal there.

Models are built from configs (2+2 layers, d_model 64, `seq2seq_support`) with sharp attention: query and
key projections (T5 family: the relative bias) scaled so scores reach tens, as in trained models.

    paged (token for token, greedy and beam 2, and the load-time self-check passes):
        Marian, BART, mBART, M2M100, NLLB-style M2M100, Pegasus, Blenderbot, Blenderbot-small, PLBart, T5, mT5
    batched-`generate` fallback (refused by `check_model` with a reason; padded batches equal `generate` alone):
        UMT5 (per-layer relative bias), LongT5 (local attention), ProphetNet (n-gram streams), FSMT (own attention)
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from executor_support import request
from seq2seq_support import EOS, START, attention_sharpness, build_pair, random_inputs

from pagedq.shared.models import GenerationOptions, TaskType, TranslateRequest
from pagedq.worker.engine.core.executor import EngineConfig, LoadedModel
from pagedq.worker.engine.decoding.seq2seq_options import decode_settings, generation_key
from pagedq.worker.engine.seq2seq.engine import Seq2SeqEngine
from pagedq.worker.engine.seq2seq.generate_fallback import EncodedText, GenerateBatcher
from pagedq.worker.engine.seq2seq.model import NOT_PAGED, UnsupportedArchitecture, check_model
from pagedq.worker.engine.seq2seq.self_check import self_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAGED = ["marian", "bart", "mbart", "m2m100", "nllb", "pegasus", "blenderbot", "blenderbot_small", "plbart", "t5",
         "mt5"]  # fmt: skip
FALLBACK = {"umt5": "umt5", "longt5": "longt5", "prophetnet": "prophetnet", "fsmt": "fsmt"}  # builder: model_type
CONFIG = EngineConfig(max_batch_tokens=256, max_running_requests=16, block_size=4)


def test_the_test_models_attend_sharply() -> None:
    """Scaled, every kind of attention puts most of a row's weight on one key (uniform: 1 / keys, < 0.1 here);
    unscaled random weights attend almost uniformly."""
    inputs = random_inputs(2, lengths=(20, 30))
    decoder = [START, *inputs[1][:12]]
    for arch in ("marian", "bart", "t5", "pegasus"):
        sharp = attention_sharpness(build_pair(arch, sharp=True).reference, inputs[0], decoder)
        assert min(sharp.values()) > 0.4, (arch, sharp)
    flat = attention_sharpness(build_pair("bart").reference, inputs[0], decoder)
    assert max(flat.values()) < 0.4, flat


@pytest.mark.parametrize("arch", PAGED)
def test_paged_family_matches_generate_greedy_and_beam(arch: str) -> None:
    pair = build_pair(arch, sharp=True)
    check_model(pair.model)
    engine = Seq2SeqEngine(pair.model, CONFIG, num_blocks=256)
    verdict = self_check(engine)
    assert verdict.passed, verdict.reason
    inputs = random_inputs(5)
    for beams in (1, 2):
        outputs = engine.generate(inputs, decode_settings(pair.model, GenerationOptions(num_beams=beams)))
        for ids, out in zip(inputs, outputs, strict=True):
            assert out.output_token_ids == pair.generate(ids, num_beams=beams), f"{beams} beams, {len(ids)} tokens"
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


@pytest.mark.parametrize("arch", sorted(FALLBACK))
def test_unpaged_family_is_refused_with_a_reason_before_the_engine_touches_it(arch: str) -> None:
    pair = build_pair(arch, sharp=True)
    attention = pair.model.config._attn_implementation
    with pytest.raises(UnsupportedArchitecture, match=NOT_PAGED[FALLBACK[arch]].split()[0]):
        Seq2SeqEngine(pair.model, CONFIG, num_blocks=64)
    assert pair.model.config._attn_implementation == attention, "the model is left as loaded"


def _fallback(pair: Any) -> GenerateBatcher:
    tokenizer = SimpleNamespace(pad_token_id=0, padding_side="right")
    loaded = LoadedModel(SimpleNamespace(name="m"), pair.model, tokenizer, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
    return GenerateBatcher(loaded, CONFIG)


@pytest.mark.parametrize("arch", sorted(FALLBACK))
@pytest.mark.parametrize("beams", [1, 2])
def test_unpaged_family_on_the_fallback_matches_generate_alone(arch: str, beams: int) -> None:
    """One padded `generate` over sentences of different lengths gives each what `generate` alone gives."""
    pair = build_pair(arch, sharp=True)
    batcher = _fallback(pair)
    inputs = random_inputs(4, lengths=(3, 24))
    options = GenerationOptions(num_beams=beams)
    for i, ids in enumerate(inputs):
        key = generation_key(options, f"r{i}", pair.model)
        encoded = EncodedText({"input_ids": ids, "attention_mask": [1] * len(ids)}, False, key)
        batcher.push(request(TaskType.TRANSLATE, TranslateRequest(text="x"), "m"), encoded, (0, float(i), i))
    done = batcher.step()
    assert len(done) == len(inputs) and batcher.steps == 1, "one generate call for the batch"
    for _, encoded, row in done:
        ids = encoded.inputs["input_ids"]
        assert _until_eos(row) == _until_eos(pair.generate(ids, num_beams=beams)), f"{len(ids)} tokens"


def _until_eos(tokens: list[int]) -> list[int]:
    """Generated tokens through the first EOS (a padded batch pads finished rows after it)."""
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_a_seeded_fallback_generate_keeps_its_tokens_while_another_thread_samples_unseeded() -> None:
    """The worker steps each model in a thread of its own: another model's unseeded draws (the paged sampler's,
    from torch's process-wide generator) must not land inside a seeded `generate` of the fallback, which seeds
    that generator. Without `DEFAULT_GENERATOR_LOCK` the seeded tokens change from run to run here."""
    import threading
    from types import SimpleNamespace

    from pagedq.worker.engine.decoding.sampling import Sampler, SamplingParams

    pair = build_pair("umt5", sharp=True)
    batcher = _fallback(pair)
    ids = random_inputs(1, lengths=(12, 12))[0]
    options = GenerationOptions(do_sample=True, temperature=1.0, seed=1234, max_new_tokens=24)

    def seeded_run() -> list[int]:
        key = generation_key(options, "seeded", pair.model)
        encoded = EncodedText({"input_ids": ids, "attention_mask": [1] * len(ids)}, False, key)
        batcher.push(request(TaskType.TRANSLATE, TranslateRequest(text="x"), "m"), encoded, (0, 0.0, 0))
        [(_, _, row)] = batcher.step()
        return row

    expected = seeded_run()
    stop = threading.Event()
    sampler, probs = Sampler(), torch.full((1, 4096), 0.0)
    other = SimpleNamespace(sampling_params=SamplingParams(temperature=1.0), generator=None)

    def unseeded_draws() -> None:
        while not stop.is_set():
            sampler._sample_row(probs[0], other)  # type: ignore[arg-type]

    drawer = threading.Thread(target=unseeded_draws, daemon=True)
    drawer.start()
    try:
        runs = [seeded_run() for _ in range(40)]
    finally:
        stop.set()
        drawer.join(5)
    assert all(run == expected for run in runs)
