"""FlashInfer paged attention (GPU): the production :class:`~.attention.AttentionBackend`.

One step of the engine is either a prefill (sequences append several tokens: a turn prompt) or a decode (every
sequence appends one token). ``plan(batch)`` keeps the step's metadata; the first ``forward`` of the step plans
the matching FlashInfer wrapper once (it needs the head counts, which it reads off the tensors), and every layer
then writes its new K/V into the pages and runs the planned kernel:

* decode steps: ``BatchDecodeWithPagedKVCacheWrapper``;
* prefill steps: ``BatchPrefillWithPagedKVCacheWrapper`` with ``causal=True``. FlashInfer aligns the causal mask
  to the bottom right, so query ``i`` of a sequence sits at position ``kv_len - q_len + i`` and sees the cached
  positions ``<=`` its own: the interface's semantics.

Keys arrive already rotated by our own RoPE (the model's compact positions, docs/model.md's design note "RoPE and
eviction", option (b)), so the kernels run with ``pos_encoding_mode="NONE"``. The cache layout is FlashInfer's NHD,
``[num_pages, 2, page_size, num_kv_heads, head_dim]`` per layer, K at index 0 and V at 1. Both wrappers share
one float workspace, allocated once: a step runs only one of them.

FlashInfer compiles its kernels on first use (just-in-time, cached under ``FLASHINFER_WORKSPACE_BASE``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from infinisst_backend.config import EngineConfig
from infinisst_backend.kernels.attention import AttentionBackend, AttentionBatch
from infinisst_backend.kernels.availability import import_flashinfer

logger = logging.getLogger(__name__)

# FlashInfer's recommended size of the float workspace (split-k partial results).
WORKSPACE_BYTES = 128 * 1024 * 1024


class FlashInferAttention(AttentionBackend):
    """Paged causal attention through FlashInfer 0.2.x (``flashinfer-python==0.2.14.post1``).

    ``prefill_backend`` is FlashInfer's prefill backend choice (``"auto"`` picks FA3 on Hopper, ``"fa2"``
    elsewhere); ``decode_tensor_cores`` runs decode through the prefill kernels (faster for large GQA groups, at
    the cost of compiling one more kernel).
    """

    def __init__(
        self,
        cfg: EngineConfig,
        prefill_backend: str = "auto",
        decode_tensor_cores: bool = False,
        scale: float | None = None,
    ):
        flashinfer = import_flashinfer()
        self.device = torch.device(cfg.device)
        if self.device.type != "cuda":
            raise ValueError(f"attention_backend='flashinfer' needs a CUDA device, got device={cfg.device!r}")
        self.scale = scale  # None: head_dim ** -0.5
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._flashinfer = flashinfer
        self._prefill_backend = prefill_backend
        self._prefill = self._new_prefill_wrapper(prefill_backend)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            float_workspace_buffer=self.workspace, kv_layout="NHD", use_tensor_cores=decode_tensor_cores
        )
        self._batch: AttentionBatch | None = None
        self._planned = False  # whether the wrapper of the current batch has been planned
        self._write_page: Tensor | None = None  # [T] page of each new token
        self._write_offset: Tensor | None = None  # [T] offset of each new token in its page

    def plan(self, batch: AttentionBatch) -> None:
        """Keep the step's metadata; the wrapper is planned at the step's first ``forward``."""
        if batch.slot_mapping.device.type != "cuda":
            raise ValueError("FlashInferAttention needs the batch's slot_mapping on the GPU")
        self._batch = batch
        self._planned = False
        # Two small device ops once per step instead of once per layer.
        self._write_page = batch.slot_mapping // batch.page_size
        self._write_offset = batch.slot_mapping % batch.page_size

    def write_slots(self) -> tuple[Tensor, Tensor]:
        if self._batch is None:
            raise RuntimeError("FlashInferAttention used before plan()")
        return self._write_page, self._write_offset

    def attend(self, layer: int, q: Tensor, kv_layer: Tensor) -> Tensor:
        """Paged causal attention over the pages (this step's K/V written). q ``[T, Hq, D]`` -> ``[T, Hq, D]``."""
        batch = self._batch
        if batch is None:
            raise RuntimeError("FlashInferAttention used before plan()")
        if q.shape[0] != batch.num_tokens:
            raise ValueError(f"q has {q.shape[0]} tokens, the planned batch has {batch.num_tokens}")
        if not self._planned:
            self._plan_wrapper(batch, q, kv_layer)
        # The kernels take q, K/V and the output in one dtype: the cache's (see EngineConfig.kv_cache_dtype).
        return self._run(batch, q.to(kv_layer.dtype), kv_layer).to(q.dtype)

    def _run(self, batch: AttentionBatch, q: Tensor, kv_layer: Tensor) -> Tensor:
        if batch.is_decode:
            return self._decode.run(q, kv_layer)
        if self._prefill_backend != "auto":
            return self._prefill.run(q, kv_layer)
        try:  # the first prefill with backend "auto" also proves its kernels run here
            out = self._prefill.run(q, kv_layer)
        except Exception:
            self._fall_back_to_fa2(batch, q, kv_layer)
            return self._prefill.run(q, kv_layer)
        self._prefill_backend = "auto (verified)"
        return out

    def _plan_wrapper(self, batch: AttentionBatch, q: Tensor, kv_layer: Tensor) -> None:
        """Plan the step's wrapper once (host-side scheduling and a few small host-to-device copies)."""
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads, page_size = kv_layer.shape[3], kv_layer.shape[2]
        if page_size != batch.page_size or kv_layer.shape[4] != head_dim:
            raise ValueError(f"kv_layer {tuple(kv_layer.shape)} does not match page_size/head_dim of the batch")
        scale = self.scale if self.scale is not None else head_dim**-0.5
        if batch.is_decode:
            self._decode.plan(
                indptr=batch.kv_indptr_cpu,
                indices=batch.kv_indices_cpu,
                last_page_len=batch.kv_last_page_len_cpu,
                num_qo_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                page_size=page_size,
                pos_encoding_mode="NONE",
                q_data_type=kv_layer.dtype,
                kv_data_type=kv_layer.dtype,
                sm_scale=scale,
            )
        else:
            try:
                self._plan_prefill(batch, num_heads, num_kv_heads, head_dim, page_size, scale, kv_layer.dtype)
            except Exception:
                if self._prefill_backend != "auto":
                    raise
                self._fall_back_to_fa2(batch, q, kv_layer)
        self._planned = True

    def _fall_back_to_fa2(self, batch: AttentionBatch, q: Tensor, kv_layer: Tensor) -> None:
        """ "auto" picks FA3 on Hopper; if its kernels cannot be built or run here, FA2 serves every GPU."""
        logger.exception("FlashInfer prefill backend 'auto' failed; falling back to 'fa2'")
        self._prefill_backend = "fa2"
        self._prefill = self._new_prefill_wrapper("fa2")
        self._plan_wrapper(batch, q, kv_layer)

    def _new_prefill_wrapper(self, backend: str):
        return self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            float_workspace_buffer=self.workspace, kv_layout="NHD", backend=backend
        )

    def _plan_prefill(
        self,
        batch: AttentionBatch,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        scale: float,
        kv_dtype: torch.dtype,
    ) -> None:
        self._prefill.plan(
            qo_indptr=batch.qo_indptr_cpu,
            paged_kv_indptr=batch.kv_indptr_cpu,
            paged_kv_indices=batch.kv_indices_cpu,
            paged_kv_last_page_len=batch.kv_last_page_len_cpu,
            num_qo_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim_qk=head_dim,
            page_size=page_size,
            causal=True,
            pos_encoding_mode="NONE",
            sm_scale=scale,
            q_data_type=kv_dtype,
            kv_data_type=kv_dtype,
        )
