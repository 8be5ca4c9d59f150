"""The CTranslate2 peer of the W1/W4 benchmarks (bench/peers_ct2.py): a tiny random Llama and Marian converted
through the benchmark's own code give, in fp32, transformers' `generate` greedy output token for token (Marian:
beam 4 too), chunked as the benchmarks chunk them; int8 runs and returns each request's own length. Attention is
sharpened (query and key scaled: scores of tens, as trained models have) so that a wrong mask or position shows;
a vocabulary of 512 keeps the top two logits well apart, so fp32 rounding never decides a token."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from repo_paths import BENCH
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, MarianConfig, MarianMTModel

sys.path.insert(0, str(BENCH))  # the scripts import their siblings by bare name, as `python bench/x.py` does

import peers_ct2  # noqa: E402
from peer_process import PeerError  # noqa: E402

pytest.importorskip("ctranslate2")  # in the dev extra: runs wherever `make install` ran

VOCAB, EOS, PAD = 512, 0, 511
QK_SCALE = 12.0  # random init attends almost uniformly (scores ~0.1); x12 on q and k: scores of tens


def sharpen(model: Any) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                module.weight.mul_(QK_SCALE)
                if module.bias is not None:
                    module.bias.mul_(QK_SCALE)


def tiny_llama() -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    sharpen(model)
    model.generation_config.eos_token_id = None
    return model


def tiny_marian() -> Any:
    """W4's model in small: </s> 0 biased away (lengths come from the targets), <pad> last, forced </s>."""
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, forced_eos_token_id=EOS,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MarianMTModel(config).eval()
    sharpen(model)
    with torch.no_grad():
        model.final_logits_bias[0, EOS] = -1.0e4
    model.generation_config = GenerationConfig(
        decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=EOS,
        bad_words_ids=[[PAD]], max_length=256,
    )  # fmt: skip
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    model = tiny_llama()
    path, tokens = peers_ct2.convert_llama(model, tmp_path_factory.mktemp("llama"))
    return model, path, tokens


@pytest.fixture(scope="module")
def marian(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    model = tiny_marian()
    path, tokens = peers_ct2.convert_marian(model, tmp_path_factory.mktemp("marian"))
    return model, path, tokens


def prompts(count: int, low: int, high: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, PAD) for _ in range(rng.randint(low, high))] for _ in range(count)]


# chunks of 2 examples: prompts of unequal length and targets share a chunk; tokens: a budget cuts them
BATCHINGS = [peers_ct2.Batching("examples", 2), peers_ct2.Batching("tokens", 64)]


@pytest.mark.parametrize("batching", BATCHINGS, ids=str)
def test_generator_fp32_greedy_equals_generate(llama: tuple[Any, Path, list[str]], batching: Any) -> None:
    model, path, tokens = llama
    reqs = list(zip(prompts(5, 3, 20), [7, 12, 3, 9, 15], strict=True))
    generator = peers_ct2.load("generator", path, "float32", threads=1)
    outputs = peers_ct2.generate(generator, tokens, reqs, batching)
    with torch.inference_mode():
        expected = [
            model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p) :].tolist()
            for p, n in reqs
        ]
    assert outputs == expected
    assert peers_ct2.agreement(outputs, expected) == (5, 1.0)


def test_generator_int8_returns_each_requests_length(llama: tuple[Any, Path, list[str]]) -> None:
    _, path, tokens = llama
    reqs = list(zip(prompts(4, 3, 20, seed=2), [5, 11, 2, 8], strict=True))
    generator = peers_ct2.load("generator", path, "int8", threads=1)
    outputs = peers_ct2.generate(generator, tokens, reqs, BATCHINGS[0])
    assert [len(o) for o in outputs] == [n for _, n in reqs]
    assert all(0 <= t < VOCAB for o in outputs for t in o)


def translations(model: Any, sentences: list[list[int]], targets: list[int], beams: int) -> list[list[int]]:
    """Per-sentence `generate` to each target (the last token the forced </s>), as W4's reference."""
    with torch.inference_mode():
        return [
            model.generate(torch.tensor([s]), max_new_tokens=t, num_beams=beams)[0, 1:].tolist()
            for s, t in zip(sentences, targets, strict=True)
        ]


@pytest.mark.parametrize("beams", [1, 4])
def test_translator_fp32_equals_generate(marian: tuple[Any, Path, list[str]], beams: int) -> None:
    model, path, tokens = marian
    sentences = [s + [EOS] for s in prompts(5, 3, 20, seed=3)]
    targets = [6, 10, 4, 13, 8]
    translator = peers_ct2.load("translator", path, "float32", threads=1)
    outputs = peers_ct2.translate(translator, tokens, sentences, targets, beams, BATCHINGS[0], EOS)
    assert outputs == translations(model, sentences, targets, beams)
    assert [len(o) for o in outputs] == targets and all(o[-1] == EOS for o in outputs)


@pytest.mark.parametrize("beams", [1, 4])
def test_translator_int8_returns_each_sentences_length(marian: tuple[Any, Path, list[str]], beams: int) -> None:
    _, path, tokens = marian
    sentences = [s + [EOS] for s in prompts(4, 3, 20, seed=4)]
    targets = [5, 9, 4, 12]
    translator = peers_ct2.load("translator", path, "int8", threads=1)
    outputs = peers_ct2.translate(translator, tokens, sentences, targets, beams, BATCHINGS[1], EOS)
    assert [len(o) for o in outputs] == targets
    assert all(o[-1] == EOS and PAD not in o for o in outputs)


def test_a_translator_in_its_own_process_translates_as_in_process(marian: tuple[Any, Path, list[str]]) -> None:
    """The benchmarks run each CT2 model in a child process (peers_ct2.start): same outputs as generate, its CPU
    time counted from the child's /proc entry, and the child gone after close()."""
    model, path, tokens = marian
    sentences = [s + [EOS] for s in prompts(4, 3, 20, seed=5)]
    targets = [7, 5, 11, 6]
    peer = peers_ct2.start("translator", path, "float32", 1, tokens)
    try:
        outputs = peer.call("translate", sentences, targets, 1, BATCHINGS[0], EOS)
        assert outputs == translations(model, sentences, targets, 1)
        # the child's own CPU (/proc counts clock ticks of 10 ms: one tiny call may add none): it grows while
        # the child translates
        before, calls = peer.cpu_seconds(), 0
        while peer.cpu_seconds() == before and calls < 500:
            peer.call("translate", sentences, targets, 1, BATCHINGS[0], EOS)
            calls += 1
        assert peer.cpu_seconds() > before, f"no CPU time counted in {calls} calls"
        assert peer.pid != os.getpid()
    finally:
        peer.close()
    assert not peer.alive()


def test_a_peer_process_raises_its_errors_here_and_keeps_serving(marian: tuple[Any, Path, list[str]]) -> None:
    _, path, tokens = marian
    with pytest.raises(PeerError, match="RuntimeError|ValueError|No such file"):
        peers_ct2.start("translator", path / "missing", "float32", 1, tokens)
    peer = peers_ct2.start("translator", path, "int8", 1, tokens)
    try:
        with pytest.raises(PeerError, match="AttributeError.*'Peer' object has no attribute 'decode'"):
            peer.call("decode", [[5, EOS]])
        [output] = peer.call("translate", [[5, 6, EOS]], [4], 1, BATCHINGS[0], EOS)
        assert len(output) == 4 and output[-1] == EOS
    finally:
        peer.close()


def test_chunks_sort_by_length_within_the_budget() -> None:
    lengths, targets = [30, 5, 20, 10, 25], [1, 2, 3, 4, 5]
    assert peers_ct2.Batching("examples", 2).chunks(lengths, targets) == [[1, 3], [2, 4], [0]]
    assert peers_ct2.Batching("examples", 2, key="target").chunks(lengths, targets) == [[0, 1], [2, 3], [4]]
    # tokens: a chunk grows while (members + 1) x its longest input fits in 50
    assert peers_ct2.Batching("tokens", 50).chunks(lengths, targets) == [[1, 3], [2, 4], [0]]


def test_agreement_counts_tokens_before_the_first_difference() -> None:
    assert peers_ct2.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 6]]) == (1, 4 / 6)


def bench_module(name: str) -> Any:
    """bench/<name>.py loaded from its file under a name of its own (bench/engine.py's bare name is taken)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return module


def test_without_ctranslate2_the_benchmarks_skip_the_peers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = bench_module("engine")  # not `import engine`: the tests' own `engine` package has that name
    import w4_translation

    monkeypatch.setattr(peers_ct2, "available", lambda: False)
    w1_args = engine.parser().parse_args(["--quick"])
    assert engine.ct2_systems(w1_args, model=None, reqs=[]) == []
    w4_args = w4_translation.parser().parse_args(["--quick"])
    assert w4_translation.Peers(w4_args, model=None).systems(1, ([], [])) == []
    assert capsys.readouterr().out == f"{peers_ct2.SKIPPED}\n" * 2
    assert peers_ct2.SKIPPED == "ctranslate2 not installed: peers skipped (pip install 'pagedq[bench]')"
