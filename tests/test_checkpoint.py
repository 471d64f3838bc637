"""Checkpoint directory format: round trip, clear errors, and the deterministic demo checkpoint."""

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from infinisst_backend.config import ModelConfig  # noqa: E402
from infinisst_backend.kernels.attention import AttentionBatch, TorchAttention  # noqa: E402
from infinisst_backend.model import demo  # noqa: E402
from infinisst_backend.model.checkpoint import (  # noqa: E402
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    parameters_without_memory,
    read_config,
    save_checkpoint,
)
from infinisst_backend.model.infinisst import InfiniSSTModel  # noqa: E402
from infinisst_backend.model.kv_cache import PagedKVCache  # noqa: E402
from infinisst_backend.presets import demo_model_config, tiny_model_config  # noqa: E402
from infinisst_backend.text.prompt import PromptBuilder  # noqa: E402
from infinisst_backend.text.tokenizers import add_infinisst_tokens, smollm2_tokenizer  # noqa: E402

SPEECH_KEY = "model.speech_encoder.proj.weight"
LLM_KEY = "model.layers.1.self_attn.k_proj.bias"


@pytest.fixture(scope="module")
def tokenizer():
    tok = smollm2_tokenizer()
    add_infinisst_tokens(tok, "chatml")
    return tok


def tiny_config(vocab_size: int, tied: bool = False, dtype: str = "float64") -> ModelConfig:
    return tiny_model_config("chatml", "qwen2", vocab_size, dtype, rope_theta=1e6, tie_word_embeddings=tied)


def tiny_model(cfg: ModelConfig, seed: int = 0) -> InfiniSSTModel:
    model = InfiniSSTModel(cfg)
    demo.init_random_weights(model, seed)
    return model.to(torch.float64).eval()


@pytest.fixture()
def saved(tmp_path, tokenizer):
    """(path, model, cfg) of a saved tiny float64 checkpoint."""
    cfg = tiny_config(len(tokenizer))
    model = tiny_model(cfg)
    save_checkpoint(tmp_path / "ckpt", model, cfg, tokenizer)
    return tmp_path / "ckpt", model, cfg


@torch.no_grad()
def llm_logits(model: InfiniSSTModel, ids: list[int]) -> torch.Tensor:
    """Logits of a one-sequence prefill over the paged cache."""
    page_size = 16
    kv = PagedKVCache.for_model(model.cfg.llm, num_pages=8, page_size=page_size, dtype=model.dtype)
    seq = kv.new_sequence()
    seq.reserve(len(ids))
    batch = AttentionBatch.build([len(ids)], [seq.pages], [len(ids)], page_size)
    attn = TorchAttention()
    attn.plan(batch)
    hidden = model.llm(model.llm.embed(torch.tensor(ids)), batch.positions, kv, attn)
    return model.llm.logits(hidden)


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_gives_identical_tensors_and_outputs(saved, tokenizer):
    path, model, cfg = saved
    assert {CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(path))
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["format"] == "infinisst-backend" and config["format_version"] == 1

    loaded, tok, loaded_cfg = load_checkpoint(path)
    assert loaded_cfg == cfg
    original, restored = model.checkpoint_state_dict(), loaded.checkpoint_state_dict()
    assert list(restored) == list(original)
    for name, tensor in original.items():
        assert restored[name].dtype == torch.float64, name
        assert torch.equal(restored[name], tensor), name
    assert not loaded.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())

    # Each part gives identical outputs.
    audio = torch.randn(2 * 15360 + 5000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1
    assert torch.equal(loaded.speech.encode_full(audio, 2), model.speech.encode_full(audio, 2))
    cache_a, cache_b = model.speech.new_cache(1), loaded.speech.new_cache(1)
    assert torch.equal(
        loaded.speech.encode_chunk(cache_b, audio[:15360]), model.speech.encode_chunk(cache_a, audio[:15360])
    )
    ids = PromptBuilder(tok, loaded_cfg.prompt).first_turn("de", 1).input_ids()
    assert torch.equal(llm_logits(loaded, ids), llm_logits(model, ids))

    # The tokenizer round-trips too, added tokens included.
    assert len(tok) == len(tokenizer)
    text = "<|im_start|>user\nHello wörld<sp_patch><|im_end|>"
    assert tok.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


def test_storage_dtype_and_load_dtype(tmp_path, tokenizer):
    cfg = tiny_config(len(tokenizer))
    model = tiny_model(cfg)
    path = save_checkpoint(tmp_path / "f32", model, cfg, tokenizer, dtype="float32")
    assert json.loads((path / CONFIG_FILE).read_text())["dtype"] == "float32"
    assert {t.dtype for t in load_file(path / WEIGHTS_FILE).values()} == {torch.float32}

    stored, _, loaded_cfg = load_checkpoint(path)  # default: the stored dtype
    assert loaded_cfg.dtype == "float32" and stored.dtype == torch.float32
    as_bf16, _, _ = load_checkpoint(path, dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}
    expected = model.checkpoint_state_dict()[SPEECH_KEY].to(torch.float32).to(torch.bfloat16)
    assert torch.equal(as_bf16.checkpoint_state_dict()[SPEECH_KEY], expected)


def test_tied_embeddings_have_no_lm_head_key(tmp_path, tokenizer):
    cfg = tiny_config(len(tokenizer), tied=True)
    model = tiny_model(cfg)
    path = save_checkpoint(tmp_path / "tied", model, cfg, tokenizer)
    assert "lm_head.weight" not in load_file(path / WEIGHTS_FILE)
    loaded, tok, _ = load_checkpoint(path)
    ids = PromptBuilder(tok, cfg.prompt).next_turn(1).input_ids()
    assert torch.equal(llm_logits(loaded, ids), llm_logits(model, ids))


def test_parameters_without_memory_keeps_buffers(tokenizer):
    with parameters_without_memory():
        model = InfiniSSTModel(tiny_config(len(tokenizer)))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type != "meta" for b in model.buffers())
    # Outside the context, modules are normal again.
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE, "tokenizer_config.json"])
def test_missing_file_is_named(saved, name):
    path = saved[0]
    (path / name).unlink()
    with pytest.raises(ValueError, match=f"missing {name}"):
        load_checkpoint(path)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def edit_config(path, edit) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format="hf"), "format='hf'"),
        (lambda c: c.update(format_version=2), "format_version=2"),
        (lambda c: c.update(extra=1), r"unknown field\(s\) \['extra'\]"),
        (lambda c: c["llm"].update(num_layers=3), r"unknown field\(s\) in llm: \['num_layers'\]"),
        (lambda c: c["llm"].update(architecture="gpt2"), "llm.architecture='gpt2'"),
        (lambda c: c.update(dtype="int8"), "dtype='int8'"),
        (lambda c: c["prompt"].update(eos_tokens=[]), "prompt.eos_tokens"),
    ],
)
def test_bad_config_field_is_named(saved, edit, message):
    path = saved[0]
    edit_config(path, edit)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)


def test_corrupt_json(saved):
    path = saved[0]
    (path / CONFIG_FILE).write_text('{"format": "infinisst-backend", ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_config(path)
    (path / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_checkpoint(path)


def rewrite_weights(path, edit) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


def test_missing_key_is_named(saved):
    path = saved[0]
    rewrite_weights(path, lambda t: t.pop(LLM_KEY))
    with pytest.raises(ValueError, match=rf"missing key\(s\) \(1\): {LLM_KEY}"):
        load_checkpoint(path)


def test_unexpected_key_is_named(saved):
    path = saved[0]
    rewrite_weights(path, lambda t: t.update({"model.speech_encoder.speech_encoder.mask_emb": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \(1\): model.speech_encoder.speech_encoder.mask_emb"):
        load_checkpoint(path)


def test_wrong_shape_is_named(saved):
    path = saved[0]
    rewrite_weights(path, lambda t: t.update({SPEECH_KEY: torch.zeros(32, 31, dtype=torch.float64)}))
    with pytest.raises(ValueError, match=rf"shape mismatch.*{SPEECH_KEY}: checkpoint \(32, 31\) vs model \(32, 32\)"):
        load_checkpoint(path)


def test_corrupt_weights(saved):
    path = saved[0]
    (path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        load_checkpoint(path)


def test_load_state_dict_non_strict_skips_missing_but_not_shapes(saved):
    _, model, cfg = saved
    target = tiny_model(cfg, seed=1)
    sd = model.checkpoint_state_dict()
    partial = {k: v for k, v in sd.items() if k != LLM_KEY}
    target.load_checkpoint_state_dict(partial, strict=False)
    restored = target.checkpoint_state_dict()
    assert torch.equal(restored[SPEECH_KEY], sd[SPEECH_KEY])
    assert not torch.equal(restored[LLM_KEY], sd[LLM_KEY])  # left as it was
    with pytest.raises(ValueError, match=SPEECH_KEY):
        target.load_checkpoint_state_dict({SPEECH_KEY: torch.zeros(3)}, strict=False)


def test_tokenizer_without_prompt_tokens_is_rejected(tmp_path, tokenizer):
    bare = smollm2_tokenizer()  # no <sp_patch>
    cfg = tiny_config(len(tokenizer))
    with pytest.raises(ValueError, match="<sp_patch>"):
        save_checkpoint(tmp_path / "x", tiny_model(cfg), cfg, bare)
    # A checkpoint whose tokenizer lost a token fails to load with the same message.
    save_checkpoint(tmp_path / "y", tiny_model(cfg), cfg, tokenizer)
    bare.save_pretrained(tmp_path / "y")
    with pytest.raises(ValueError, match="<sp_patch>"):
        load_checkpoint(tmp_path / "y")


def test_tokenizer_larger_than_vocab_is_rejected(tmp_path, tokenizer):
    cfg = tiny_config(len(tokenizer) - 1)
    with pytest.raises(ValueError, match="vocab_size"):
        save_checkpoint(tmp_path / "x", tiny_model(cfg), cfg, tokenizer)


def test_config_must_describe_the_model(tmp_path, tokenizer):
    cfg = tiny_config(len(tokenizer))
    other = tiny_config(len(tokenizer) + 1)
    with pytest.raises(ValueError, match="differ"):
        save_checkpoint(tmp_path / "x", tiny_model(cfg), other, tokenizer)


# ---------------------------------------------------------------------------------------------- demo


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_build_is_deterministic_and_idempotent(tmp_path):
    first = demo.build_demo_checkpoint(tmp_path / "a")
    second = demo.build_demo_checkpoint(tmp_path / "b")
    for name in (WEIGHTS_FILE, CONFIG_FILE, "tokenizer.json"):
        assert sha256(first / name) == sha256(second / name), name

    # Same seed again: nothing is rewritten.
    stamp = (first / WEIGHTS_FILE).stat().st_mtime_ns
    demo.build_demo_checkpoint(first)
    assert (first / WEIGHTS_FILE).stat().st_mtime_ns == stamp
    # Another seed does not silently replace a checkpoint; the CLI's --force does.
    with pytest.raises(ValueError, match="another checkpoint"):
        demo.build_demo_checkpoint(first, seed=1)
    with pytest.raises(SystemExit):
        demo.main([str(first), "--seed", "1"])

    model, tok, cfg = load_checkpoint(first)
    assert cfg == demo_model_config(len(tok))
    assert (cfg.llm.architecture, cfg.prompt.template, cfg.dtype) == ("qwen2", "chatml", "float32")
    head = model.llm.lm_head.weight
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    others = torch.cat([head[:eos], head[eos + 1 :]]).norm(dim=1)
    assert head[eos].norm() > 2 * others.max()  # the scaled EOS row
    norms = model.llm.model.norm.weight
    assert torch.equal(norms, torch.ones_like(norms))


def test_demo_init_depends_on_the_seed_only(tokenizer):
    cfg = tiny_config(len(tokenizer))
    a, b, c = (InfiniSSTModel(cfg) for _ in range(3))
    demo.init_random_weights(a, 0)
    demo.init_random_weights(b, 0)
    demo.init_random_weights(c, 1)
    sa, sb, sc = (m.checkpoint_state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[LLM_KEY], sc[LLM_KEY])
    assert torch.allclose(sa[LLM_KEY].std(), torch.tensor(0.02), rtol=0.5)  # biases: std 0.02
    freqs = "model.speech_encoder.speech_encoder.encoder.layers.0.self_attn.rotary_emb.freqs"
    assert torch.equal(sa[freqs], InfiniSSTModel(cfg).checkpoint_state_dict()[freqs])  # not randomized
