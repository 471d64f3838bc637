"""The converter from the released InfiniSST files, on tiny synthetic checkpoints in the released layouts.

The synthetic files are written here from the layouts of docs/model.md §1.2 (key names, shapes, mixed fp32/bf16),
§1.3 (a fairseq .pt with the encoder config in cfg.model.w2v_args, or in an argparse Namespace) and §7 (a
stage-1 state dict without the LLM, a PEFT LoRA state dict), independently of the model code. After
conversion, every tensor of the loaded model is compared with the tensor it must come from, and the outputs
with references built directly from the synthetic tensors (transformers for the LLM).
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from infinisst_backend.config import LLMConfig, SpeechEncoderConfig  # noqa: E402
from infinisst_backend.kernels.attention import AttentionBatch, TorchAttention  # noqa: E402
from infinisst_backend.model import convert as conv  # noqa: E402
from infinisst_backend.model.checkpoint import load_checkpoint  # noqa: E402
from infinisst_backend.model.kv_cache import PagedKVCache  # noqa: E402
from infinisst_backend.model.speech_frontend import SpeechFrontend  # noqa: E402
from infinisst_backend.text.prompt import PromptBuilder  # noqa: E402
from infinisst_backend.text.tokenizers import CHATML_SPECIAL_TOKENS, LLAMA3_SPECIAL_TOKENS, smollm2_tokenizer  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
CONV = [(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2
CONV_SPEC = "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16,2,2)] + [(16,2,2)]"  # as fairseq writes it
E, FFN, SPEECH_LAYERS, SPEECH_HEADS = 32, 64, 2, 4  # speech encoder
H, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 64, 2, 4, 2, 8  # LLM
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LORA_RANK, LORA_ALPHA = 8, 16.0  # scale alpha / r = 2
SP = "model.speech_encoder."
SE = SP + "speech_encoder."


# ------------------------------------------------------------------------------------------------ synthetic files


def released_llm_shapes(arch: str, vocab: int) -> dict[str, tuple]:
    """Model doc §1.2 (Llama) and §7.3 (Qwen2: q/k/v biases)."""
    shapes = {"model.embed_tokens.weight": (vocab, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, H)
        shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, H)
        shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, HEADS * HEAD_DIM)
        if arch == "qwen2":
            shapes[p + "self_attn.q_proj.bias"] = (HEADS * HEAD_DIM,)
            shapes[p + "self_attn.k_proj.bias"] = (KV_HEADS * HEAD_DIM,)
            shapes[p + "self_attn.v_proj.bias"] = (KV_HEADS * HEAD_DIM,)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, H)
        shapes[p + "mlp.up_proj.weight"] = (INTER, H)
        shapes[p + "mlp.down_proj.weight"] = (H, INTER)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (vocab, H)
    return shapes


def released_w2v_shapes(rotary_freqs: bool) -> dict[str, tuple]:
    """fairseq Wav2Vec2Model (extractor_mode layer_norm, conv_bias) with InfiniSST's RoPE patch, no prefix."""
    shapes, in_ch = {"mask_emb": (E,)}, 1
    for i, (ch, kernel, _) in enumerate(CONV):
        p = f"feature_extractor.conv_layers.{i}."
        shapes |= {
            p + "0.weight": (ch, in_ch, kernel),
            p + "0.bias": (ch,),
            p + "2.1.weight": (ch,),
            p + "2.1.bias": (ch,),
        }
        in_ch = ch
    shapes |= {"layer_norm.weight": (16,), "layer_norm.bias": (16,), "post_extract_proj.weight": (E, 16)}
    shapes |= {"post_extract_proj.bias": (E,), "encoder.pos_conv.0.bias": (E,)}
    shapes |= {"encoder.pos_conv.0.weight_g": (1, 1, 128), "encoder.pos_conv.0.weight_v": (E, E // 16, 128)}
    shapes |= {"encoder.layer_norm.weight": (E,), "encoder.layer_norm.bias": (E,)}
    for j in range(SPEECH_LAYERS):
        p = f"encoder.layers.{j}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes |= {p + f"self_attn.{proj}.weight": (E, E), p + f"self_attn.{proj}.bias": (E,)}
        if rotary_freqs:
            shapes[p + "self_attn.rotary_emb.freqs"] = (E // SPEECH_HEADS // 2,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {p + f"{norm}.weight": (E,), p + f"{norm}.bias": (E,)}
        shapes |= {p + "fc1.weight": (FFN, E), p + "fc1.bias": (FFN,), p + "fc2.weight": (E, FFN), p + "fc2.bias": (E,)}
    return shapes


def released_adapter_shapes() -> dict[str, tuple]:
    shapes = {}
    for i in range(2):
        p = f"{SP}length_shrink.conv_layers.{i}."
        shapes |= {p + "0.weight": (E, E, 2), p + "2.1.weight": (E,), p + "2.1.bias": (E,)}
    return shapes | {SP + "proj.weight": (H, E), SP + "proj.bias": (H,)}


def random_tensors(shapes: dict[str, tuple], seed: int, dtype_of) -> dict[str, torch.Tensor]:
    """Seeded values: norm weights near 1, RoPE freqs near the formula (so a skipped copy would show)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("rotary_emb.freqs"):
            dim = 2 * shape[0]
            value = 1.01 / 10_000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        elif "norm" in name and name.endswith("weight") or name.endswith(".2.1.weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            value = 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        out[name] = value.to(dtype_of(name))
    return out


def mixed_dtype(name: str) -> torch.dtype:
    """Frozen parts (the speech encoder, RoPE freqs) bf16, trainable ones fp32 (docs/model.md §1.1)."""
    return BF16 if name.startswith(SE) else F32


def base_tokenizer(arch: str):
    """SmolLM2's tokenizer with the family's specials: the stand-in for Llama-3.1's / Qwen2.5's tokenizer."""
    tokenizer = smollm2_tokenizer()
    specials = LLAMA3_SPECIAL_TOKENS if arch == "llama" else CHATML_SPECIAL_TOKENS
    tokenizer.add_tokens([t for t in specials if t not in tokenizer.get_vocab()], special_tokens=True)
    return tokenizer


def hf_config(arch: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    if arch == "llama":
        return transformers.LlamaConfig(
            rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=dict(LLAMA3_ROPE), **common
        )
    return transformers.Qwen2Config(rms_norm_eps=1e-6, rope_theta=1e6, **common)


def write_hf_dir(path, arch: str, vocab: int, seed: int):
    """A Hugging Face LLM directory (save_pretrained, sharded) with seeded weights; returns them (float64)."""
    config = hf_config(arch, vocab)
    klass = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    model = klass(config)
    weights = random_tensors(released_llm_shapes(arch, vocab), seed, lambda _: torch.float64)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    model.save_pretrained(path, max_shard_size="100KB")
    base_tokenizer(arch).save_pretrained(path)
    return {k: v.float().double() for k, v in weights.items()}  # what the (float32) shards hold


def fairseq_checkpoint(weights: dict[str, torch.Tensor], style: str) -> dict:
    """What torch.load returns for wav2vec_vox_960h_pl.pt: the encoder config nested in the fine-tuning config."""
    encoder = dict(
        _name="wav2vec2",
        extractor_mode="layer_norm",
        encoder_layers=SPEECH_LAYERS,
        encoder_embed_dim=E,
        encoder_ffn_embed_dim=FFN,
        encoder_attention_heads=SPEECH_HEADS,
        activation_fn="gelu",
        layer_norm_first=True,
        conv_feature_layers=CONV_SPEC,
        conv_bias=True,
        dropout=0.1,
    )
    model = OrderedDict((conv.W2V_PREFIX + k, v) for k, v in weights.items())
    model["w2v_encoder.proj.weight"] = torch.ones(32, E)  # the CTC head, never used
    model["w2v_encoder.proj.bias"] = torch.ones(32)
    if style == "cfg":  # fairseq >= 0.10 (hydra): plain nested dicts
        cfg = {"_name": None, "common": {"fp16": True}, "task": {"_name": "audio_finetuning", "normalize": True}}
        cfg["model"] = {"_name": "wav2vec_ctc", "normalize": True, "w2v_args": {"model": encoder, "task": {}}}
        return {"args": None, "cfg": cfg, "model": model, "optimizer_history": [{"num_updates": 1}], "extra_state": {}}
    # fairseq < 0.10: flat argparse Namespaces
    args = argparse.Namespace(arch="wav2vec_ctc", normalize=True, w2v_args=argparse.Namespace(**encoder))
    return {"args": args, "model": model, "extra_state": {"epoch": 3}}


def lora_state_dict(targets: dict[str, tuple], seed: int, extra_full: dict[str, torch.Tensor]) -> dict:
    """PEFT's keys in a Lightning state dict after prune_bin: base_model.model.<module>.lora_X.lora_adapter.weight."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (out_dim, in_dim) in targets.items():
        module = "base_model.model." + key.removesuffix(".weight")
        sd[module + ".lora_A.lora_adapter.weight"] = 0.3 * torch.randn(LORA_RANK, in_dim, generator=gen)
        sd[module + ".lora_B.lora_adapter.weight"] = 0.3 * torch.randn(out_dim, LORA_RANK, generator=gen)
    for key, value in extra_full.items():
        sd["base_model.model." + key] = value
    return sd


def linear_weights(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Every nn.Linear weight but lm_head (PEFT all-linear): 2-D weights that are not embeddings / convs."""
    return {
        k: s
        for k, s in shapes.items()
        if len(s) == 2 and k.endswith(".weight") and k not in ("model.embed_tokens.weight", "lm_head.weight")
    }


@pytest.fixture(scope="module")
def llama_release(tmp_path_factory):
    """The paper's files: Llama HF dir, fairseq .pt (cfg dicts), pytorch_model.bin holding everything."""
    root = tmp_path_factory.mktemp("llama")
    base = base_tokenizer("llama")
    write_hf_dir(root / "llm", "llama", len(base), seed=1)
    tok = {t: i for t, i in base.get_vocab().items() if t in LLAMA3_SPECIAL_TOKENS}
    eos = [tok["<|eot_id|>"], tok["<|end_of_text|>"]]
    (root / "llm" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    # A config.json in the transformers 4.x layout of the real release (rope_theta + rope_scaling).
    hf = json.loads((root / "llm" / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
    (root / "llm" / "config.json").write_text(json.dumps(hf))

    vocab = len(base) + 7
    shapes = released_llm_shapes("llama", vocab)
    shapes |= {SE + k: s for k, s in released_w2v_shapes(rotary_freqs=True).items()}
    shapes |= released_adapter_shapes()
    sd = random_tensors(shapes, seed=2, dtype_of=mixed_dtype)
    torch.save(sd, root / "pytorch_model.bin")
    w2v = random_tensors(released_w2v_shapes(rotary_freqs=False), seed=3, dtype_of=lambda _: F32)
    torch.save(fairseq_checkpoint(w2v, "cfg"), root / "w2v.pt")
    return root, sd, len(base)


@pytest.fixture(scope="module")
def qwen_release(tmp_path_factory):
    """The flashinfer branch's files: Qwen HF dir with padded vocabulary, fairseq .pt (Namespace, legacy torch
    format), a stage-1 state dict with only speech weights (half RoPE: no freqs), a stage-2 PEFT state dict."""
    root = tmp_path_factory.mktemp("qwen")
    base_len = len(base_tokenizer("qwen2"))
    # Two padding rows: InfiniSST's 4 added tokens (3 speech + pad) take them, then 2 rows need a fresh init.
    hf = write_hf_dir(root / "llm", "qwen2", base_len + 2, seed=4)
    stage1 = {SE + k: s for k, s in released_w2v_shapes(rotary_freqs=False).items()} | released_adapter_shapes()
    stage1 = random_tensors(stage1, seed=5, dtype_of=mixed_dtype)
    del stage1[SE + "layer_norm.weight"]  # absent: the reference then keeps the wav2vec .pt's value
    torch.save(stage1, root / "stage1.bin")
    w2v = random_tensors(released_w2v_shapes(rotary_freqs=False), seed=6, dtype_of=lambda _: F32)
    torch.save(fairseq_checkpoint(w2v, "namespace"), root / "w2v.pt", _use_new_zipfile_serialization=False)

    shapes = released_llm_shapes("qwen2", 1) | {SE + k: s for k, s in released_w2v_shapes(False).items()}
    targets = linear_weights(shapes | released_adapter_shapes())
    full = {
        "model.norm.weight": torch.full((H,), 1.5),  # stage 2's own copy overrides the base LLM's
        "model.layers.0.mlp.up_proj.base_layer.weight": torch.randn(
            INTER, H, generator=torch.Generator().manual_seed(7)
        ),
    }
    torch.save(lora_state_dict(targets, seed=8, extra_full=full), root / "lora.bin")
    return root, hf, stage1, w2v, base_len, targets


# ------------------------------------------------------------------------------------------------ references


@torch.no_grad()
def our_logits(model, ids: list[int]) -> torch.Tensor:
    kv = PagedKVCache.for_model(model.cfg.llm, num_pages=16, page_size=16, dtype=model.dtype)
    seq = kv.new_sequence()
    seq.reserve(len(ids))
    batch = AttentionBatch.build([len(ids)], [seq.pages], [len(ids)], 16)
    attn = TorchAttention()
    attn.plan(batch)
    hidden = model.llm(model.llm.embed(torch.tensor(ids)), batch.positions, kv, attn)
    return model.llm.logits(hidden)


@torch.no_grad()
def hf_logits(arch: str, weights: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    klass = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    model = klass(hf_config(arch, weights["model.embed_tokens.weight"].shape[0])).double().eval()
    model.load_state_dict(weights, strict=True)
    return model(torch.tensor([ids])).logits[0]


def check_speech(model, cfg: SpeechEncoderConfig, expected: dict[str, torch.Tensor]) -> None:
    """Every speech tensor is the expected one, and the outputs equal a frontend loaded directly with them."""
    loaded = {k: v for k, v in model.speech.state_dict().items()}
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    reference = SpeechFrontend(cfg, H).double().eval()
    reference.load_state_dict(expected, strict=True)
    audio = 0.1 * torch.randn(15360 + 7000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(model.speech.encode_full(audio, 1), reference.encode_full(audio, 1))


def check_llm(model, arch: str, expected: dict[str, torch.Tensor], ids: list[int]) -> None:
    loaded = model.llm.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    ours, ref = our_logits(model, ids), hf_logits(arch, expected, ids)
    assert ref.abs().max() > 0.5  # logits that a wrong weight would change visibly
    # HF keeps RMSNorm and RoPE in float32 even for a float64 model: tolerances at float32 rounding.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def expected_speech_config(rope_variant: str) -> SpeechEncoderConfig:
    return SpeechEncoderConfig(
        conv_layers=CONV,
        conv_bias=True,
        extractor_mode="layer_norm",
        embed_dim=E,
        num_layers=SPEECH_LAYERS,
        num_heads=SPEECH_HEADS,
        ffn_dim=FFN,
        rope_variant=rope_variant,
    )


def strip_speech(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Speech tensors without the model.speech_encoder. prefix, less the keys the model does not use."""
    unused = ("mask_emb", "encoder.pos_conv.")
    return {
        k.removeprefix(SP): v.double()
        for k, v in sd.items()
        if k.startswith(SP) and not k.removeprefix(SE).startswith(unused)
    }


def convert_llama(llama_release, out, **kwargs):
    root = llama_release[0]
    return conv.convert(
        out,
        llm_dir=root / "llm",
        wav2vec=root / "w2v.pt",
        state_dict=root / "pytorch_model.bin",
        progress=False,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------ conversions


def test_llama_release_converts_exactly(llama_release, tmp_path):
    root, sd, base_len = llama_release
    path = convert_llama(llama_release, tmp_path / "out", dtype="float64")
    model, tokenizer, cfg = load_checkpoint(path)

    # Config: LLM from the 4.x-layout config.json, encoder from cfg.model.w2v_args, interleaved RoPE (freqs keys).
    assert cfg.llm == LLMConfig(
        architecture="llama",
        vocab_size=base_len + 7,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        rope_scaling=LLAMA3_ROPE,
        attention_bias=False,
    )
    assert cfg.speech_encoder == expected_speech_config("interleaved")
    assert cfg.prompt.template == "llama3" and cfg.prompt.system_text == conv.PAPER_SYSTEM_TEXT
    assert cfg.prompt.eos_tokens == ["<|eot_id|>", "<|end_of_text|>"]  # from generation_config.json
    assert cfg.prompt.latency_tokens == [f"<latency_{m}>" for m in range(1, 5)]

    # The 7 tokens in the paper's order, right after the base vocabulary (128256..128262 for Llama-3.1).
    added = ["<sp_patch>", "<sp_start>", "<sp_end>"] + [f"<latency_{m}>" for m in range(1, 5)]
    assert tokenizer.convert_tokens_to_ids(added) == list(range(base_len, base_len + 7))
    assert len(tokenizer) == base_len + 7 and tokenizer.pad_token == "<|finetune_right_pad_id|>"

    # Every weight from pytorch_model.bin (not the HF shards, not the .pt), upcast exactly.
    llm = {k: v.double() for k, v in sd.items() if not k.startswith(SP)}
    ids = PromptBuilder(tokenizer, cfg.prompt).first_turn("de", 1).input_ids()[:40]
    check_llm(model, "llama", llm, ids)
    check_speech(model, cfg.speech_encoder, strip_speech(sd))

    record = json.loads((path / conv.CONVERSION_FILE).read_text())
    assert record["speech_rope"] == "interleaved"
    assert sorted(record["dropped_keys"]) == sorted(
        f"pytorch_model.bin: {SE}{k}"
        for k in ("mask_emb", *(f"encoder.pos_conv.0.{n}" for n in ("bias", "weight_g", "weight_v")))
    )


def test_default_dtype_is_bf16(llama_release, tmp_path):
    root, sd, _ = llama_release
    path = convert_llama(llama_release, tmp_path / "bf16")
    model, _, cfg = load_checkpoint(path)
    assert cfg.dtype == "bfloat16" and {p.dtype for p in model.parameters()} == {BF16}
    state = model.checkpoint_state_dict()
    for name in ("model.layers.1.mlp.down_proj.weight", SE + "encoder.layers.0.fc1.weight", SP + "proj.bias"):
        assert torch.equal(state[name], sd[name].to(BF16)), name


def test_qwen_lora_converts_exactly(qwen_release, tmp_path):
    root, hf, stage1, w2v, base_len, targets = qwen_release
    out = tmp_path / "qwen"
    argv = [str(out), "--llm", str(root / "llm"), "--wav2vec", str(root / "w2v.pt"), "--state-dict"]
    argv += [str(root / "stage1.bin"), "--lora", str(root / "lora.bin"), "--dtype", "float64", "--no-progress"]
    conv.main(argv)
    model, tokenizer, cfg = load_checkpoint(out)

    assert cfg.llm.architecture == "qwen2" and cfg.llm.rope_theta == 1e6 and cfg.llm.rope_scaling is None
    assert cfg.llm.rms_norm_eps == 1e-6 and cfg.llm.vocab_size == base_len + 4
    assert cfg.speech_encoder == expected_speech_config("half")  # no freqs keys
    assert cfg.prompt.template == "chatml" and cfg.prompt.latency_tokens == []
    assert cfg.prompt.system_text == conv.INTERPRETER_SYSTEM_TEXT
    assert cfg.prompt.eos_tokens == ["<|im_end|>", "<|endoftext|>"]
    added = ["<sp_patch>", "<sp_start>", "<sp_end>", "<|finetune_right_pad_id|>"]  # ids 151665..151668 for Qwen2.5
    assert tokenizer.convert_tokens_to_ids(added) == list(range(base_len, base_len + 4))

    # Expected weights, by the reference's load order: LoRA file's full weights > stage 1 > HF > wav2vec .pt,
    # then W + alpha / r * B @ A.
    lora = torch.load(root / "lora.bin", weights_only=True)
    full = {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
        for k, v in lora.items()
        if ".lora_" not in k
    }
    expected = {k: v.clone() for k, v in hf.items()}
    expected |= {SE + k: v.double() for k, v in w2v.items()} | {k: v.double() for k, v in stage1.items()}
    expected |= {k: v.double() for k, v in full.items()}
    for key in targets:
        module = "base_model.model." + key.removesuffix(".weight")
        a = lora[module + ".lora_A.lora_adapter.weight"].double()
        b = lora[module + ".lora_B.lora_adapter.weight"].double()
        expected[key] = expected[key] + (LORA_ALPHA / LORA_RANK) * (b @ a)
    # Vocabulary: the base matrix's first rows (transformers' resize), then the mean row for the rows it lacks.
    rows = base_len + 4
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = hf[key].mean(dim=0, keepdim=True).expand(rows - hf[key].shape[0], -1)
        expected[key] = torch.cat([hf[key], extra])

    llm = {k: v for k, v in expected.items() if not k.startswith(SP)}
    ids = PromptBuilder(tokenizer, cfg.prompt).first_turn("zh", 1).input_ids()[:40]
    check_llm(model, "qwen2", llm, ids)
    speech = strip_speech({k: v for k, v in expected.items() if k.startswith(SP)})
    check_speech(model, cfg.speech_encoder, speech)

    # The merge is W + (alpha / r) B A on specific matrices, from each kind of source.
    state = model.checkpoint_state_dict()
    for key, base in [
        ("model.layers.1.self_attn.k_proj.weight", hf["model.layers.1.self_attn.k_proj.weight"]),  # HF shards
        ("model.layers.0.mlp.up_proj.weight", full["model.layers.0.mlp.up_proj.weight"].double()),  # base_layer
        (SE + "encoder.layers.1.self_attn.q_proj.weight", stage1[SE + "encoder.layers.1.self_attn.q_proj.weight"]),
        (SE + "post_extract_proj.weight", stage1[SE + "post_extract_proj.weight"]),
        (SP + "proj.weight", stage1[SP + "proj.weight"]),
    ]:
        module = "base_model.model." + key.removesuffix(".weight")
        a, b = lora[module + ".lora_A.lora_adapter.weight"], lora[module + ".lora_B.lora_adapter.weight"]
        delta = 2.0 * (b.double() @ a.double())
        torch.testing.assert_close(state[key], base.double() + delta, rtol=1e-12, atol=1e-12)
        assert (state[key] - base.double()).abs().max() > 0.1  # the merge did change it
    assert torch.equal(state["model.norm.weight"], torch.full((H,), 1.5, dtype=torch.float64))
    assert torch.equal(state[SE + "layer_norm.weight"], w2v["layer_norm.weight"].double())  # from the .pt
    assert json.loads((out / conv.CONVERSION_FILE).read_text())["lora"]["ranks"] == [LORA_RANK]


# ------------------------------------------------------------------------------------------------ errors


def rewrite_bin(llama_release, tmp_path, edit):
    """A copy of the Llama inputs with pytorch_model.bin edited."""
    root, sd, _ = llama_release
    edited = dict(sd)
    edit(edited)
    torch.save(edited, tmp_path / "pytorch_model.bin")
    return tmp_path / "pytorch_model.bin"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop(SP + "proj.bias"), r"missing tensor\(s\) \(1\).*model\.speech_encoder\.proj\.bias"),
        (
            lambda sd: sd.update({SE + "encoder.layers.1.fc1.weight": torch.zeros(FFN, E + 1)}),
            r"encoder\.layers\.1\.fc1\.weight: pytorch_model\.bin has shape \[64, 33\], the model needs \[64, 32\]",
        ),
        (lambda sd: sd.update({SP + "extra.weight": torch.zeros(2)}), r"tensor\(s\) the model does not have.*extra"),
        (
            lambda sd: sd.update({"model.embed_tokens.weight": torch.zeros(100, H)}),
            r"model\.embed_tokens\.weight has 100 rows",
        ),
    ],
    ids=["missing", "shape", "unexpected", "vocab"],
)
def test_mismatched_state_dict_is_named(llama_release, tmp_path, edit, message):
    root = llama_release[0]
    state_dict = rewrite_bin(llama_release, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        conv.convert(
            tmp_path / "out", llm_dir=root / "llm", wav2vec=root / "w2v.pt", state_dict=state_dict, progress=False
        )
    assert not (tmp_path / "out").exists()  # nothing written


def test_truncated_files_are_named(llama_release, tmp_path):
    root = llama_release[0]
    data = (root / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*pytorch_model\.bin"):
        conv.convert(
            tmp_path / "a", llm_dir=root / "llm", wav2vec=root / "w2v.pt", state_dict=tmp_path / "pytorch_model.bin"
        )
    data = (root / "w2v.pt").read_bytes()
    (tmp_path / "w2v.pt").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cannot read .*w2v\.pt"):
        conv.read_fairseq_checkpoint(tmp_path / "w2v.pt")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_a_pickle_is_refused(llama_release, tmp_path):
    root, sd, _ = llama_release
    marker = tmp_path / "pwned"
    checkpoint = fairseq_checkpoint({}, "cfg")
    checkpoint["extra_state"] = {"payload": _Exploit(marker)}
    torch.save(checkpoint, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: the pickle references (posix|os)\.system.*refusing"):
        conv.read_fairseq_checkpoint(tmp_path / "evil.pt")
    torch.save({**sd, "x": _Exploit(marker)}, tmp_path / "evil.bin")  # weights_only refuses it too
    with pytest.raises(ValueError, match=r"cannot read .*evil\.bin as a state dict"):
        conv.convert(tmp_path / "out", llm_dir=root / "llm", wav2vec=root / "w2v.pt", state_dict=tmp_path / "evil.bin")
    assert not marker.exists()


def omegaconf_like(monkeypatch, tree: dict):
    """``tree`` as fairseq pickles an omegaconf DictConfig (checked against omegaconf 2.1): classes from
    omegaconf modules whose state is {_metadata, _parent, _content: {key: node}}, nodes {_val, _metadata,
    _parent}, enum values as fairseq enum members. Fake modules stand in for omegaconf and fairseq, which the
    converter must not need."""
    classes = {}
    for parent in ("omegaconf", "fairseq", "fairseq.dataclass"):  # pickle imports the parents first
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    for module, names in {
        "omegaconf.dictconfig": ["DictConfig"],
        "omegaconf.listconfig": ["ListConfig"],
        "omegaconf.nodes": ["AnyNode", "IntegerNode", "StringNode", "BooleanNode", "EnumNode"],
        "omegaconf.base": ["ContainerMetadata", "Metadata"],
    }.items():
        fake = types.ModuleType(module)
        for name in names:
            classes[name] = type(name, (), {"__module__": module})
            setattr(fake, name, classes[name])
        monkeypatch.setitem(sys.modules, module, fake)
    choices = enum.Enum(
        "Choices", {"default": "default", "layer_norm": "layer_norm"}, module="fairseq.dataclass.constants"
    )
    constants = types.ModuleType("fairseq.dataclass.constants")
    constants.Choices = choices
    monkeypatch.setitem(sys.modules, "fairseq.dataclass.constants", constants)

    def build(value, parent):
        if isinstance(value, dict | list):
            container = classes["DictConfig" if isinstance(value, dict) else "ListConfig"]()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            content = {k: build(v, container) for k, v in items}
            container.__dict__.update(
                _metadata=classes["ContainerMetadata"](),
                _parent=parent,
                _content=content if isinstance(value, dict) else list(content.values()),
            )
            return container
        kind = {bool: "BooleanNode", int: "IntegerNode", str: "StringNode"}.get(type(value), "AnyNode")
        if value in ("layer_norm", "default"):
            value, kind = choices(value), "EnumNode"
        node = classes[kind]()
        node.__dict__.update(_val=value, _metadata=classes["Metadata"](), _parent=parent)
        return node

    return build(tree, None)


def test_fairseq_config_forms(tmp_path, monkeypatch):
    """cfg dicts, Namespaces and omegaconf objects give the same encoder config; junk is refused."""
    for style in ("cfg", "namespace", "omegaconf"):
        checkpoint = fairseq_checkpoint({}, "cfg" if style == "omegaconf" else style)
        if style == "omegaconf":
            checkpoint["cfg"] = omegaconf_like(monkeypatch, checkpoint["cfg"])
        torch.save(checkpoint, tmp_path / f"{style}.pt")
        monkeypatch.undo()  # the converter must read it without those modules
        args = conv.read_fairseq_checkpoint(tmp_path / f"{style}.pt").encoder_args
        assert conv.speech_config(args, "half", 2) == expected_speech_config("half"), style

    assert conv.parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2") == conv.parse_conv_layers(
        "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
    )
    assert conv.parse_conv_layers("2 * [(1024, 2, 2)]") == [(1024, 2, 2)] * 2
    for bad in ("__import__('os').system('x')", "[(512, 10)]", "[(1,2,3)] +"):
        with pytest.raises(ValueError, match="invalid conv_feature_layers"):
            conv.parse_conv_layers(bad)
    with pytest.raises(ValueError, match="layer_norm_first=False"):
        conv.speech_config({"layer_norm_first": False}, "half", 2)


def test_resize_rows_is_deterministic():
    matrix = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert torch.equal(conv.resize_rows(matrix, 2), matrix[:2])
    grown = conv.resize_rows(matrix, 6)
    assert torch.equal(grown[:4], matrix) and torch.equal(grown[4:], torch.tensor([[4.5, 5.5, 6.5]] * 2))
    assert math.isclose(float(grown.sum()), float(matrix.sum()) + 2 * 16.5)


def test_refuses_to_overwrite(llama_release, tmp_path):
    convert_llama(llama_release, tmp_path / "out", dtype="float32")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        convert_llama(llama_release, tmp_path / "out")
