"""Build and drive the real engine prefix caches on CPU, the way the engines' schedulers do.

vLLM: a real ``KVCacheManager`` (its ``BlockPool``, coordinator and single-type manager) over a one-group
full-attention config; requests go through ``get_computed_blocks`` -> ``allocate_slots`` -> ``free`` like
``Scheduler.schedule``/``_free_request``. Nothing here is a copy of vLLM code.

SGLang: real ``ReqToTokenPool``, ``MHATokenToKVPool`` and ``TokenToKVPoolAllocator`` on ``device="cpu"`` under a
real ``RadixCache`` or ``UnifiedRadixCache``; a finished request is released with the real
``release_kv_cache(req, cache, checkpoint=True)``, set up like SGLang's own test kit does. For the host tier
the real ``init_hicache`` builds the real controller and host pool; two CUDA-only calls are replaced by
CPU stand-ins (``cudaHostRegister`` of the host buffer, and the device->host copy kernel from ``sgl_kernel``),
so the tree's backup, demotion and host eviction logic runs unchanged while no bytes are copied.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.sampling.sampling_params import SamplingParams as SglSamplingParams
from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request, RequestStatus

__all__ = ["SglangSetup", "VllmSetup", "enable_cpu_hicache", "make_sglang", "make_vllm"]

VLLM_BLOCK = 4


@dataclass
class VllmSetup:
    manager: Any
    hasher: Any

    @property
    def pool(self) -> Any:
        return self.manager.block_pool

    def request(self, request_id: str, prompt: Sequence[int]) -> Any:
        return Request(request_id, list(prompt), SamplingParams(max_tokens=16), None, block_hasher=self.hasher)

    def prefill(self, request: Any) -> int:
        """Schedule the whole prompt (prefix hit + new tokens); returns the number of hit tokens."""
        computed, num_hit, _shared_prefix_boundary = self.manager.get_computed_blocks(request)
        new = self.manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, computed)
        assert new is not None, "pool too small for the prompt"
        request.num_computed_tokens = request.num_tokens
        return int(num_hit)

    def decode(self, request: Any, tokens: Sequence[int]) -> None:
        """Generate ``tokens`` (one step each): their KV is written and full blocks get cached."""
        for token in tokens:
            request.append_output_token_ids(token)
            assert self.manager.allocate_slots(request, 1) is not None
            request.num_computed_tokens += 1

    def finish(self, request: Any) -> None:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        self.manager.free(request)

    def run(self, request_id: str, prompt: Sequence[int], output: Sequence[int] = ()) -> Any:
        request = self.request(request_id, prompt)
        self.prefill(request)
        self.decode(request, output)
        self.finish(request)
        return request

    def allocate(self, num_blocks: int) -> list[Any]:
        """Take blocks from the free queue, as a new request's allocation would (evicting the LRU cached ones)."""
        return list(self.pool.get_new_blocks(num_blocks))


def make_vllm(num_blocks: int = 16, *, enable_caching: bool = True) -> VllmSetup:
    init_none_hash(sha256)
    spec = FullAttentionSpec(block_size=VLLM_BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)]
    )
    manager = KVCacheManager(
        config,
        max_model_len=256,
        scheduler_block_size=VLLM_BLOCK,
        hash_block_size=VLLM_BLOCK,
        enable_caching=enable_caching,
        enable_kv_cache_events=True,
    )
    return VllmSetup(manager, get_request_block_hasher(VLLM_BLOCK, sha256))


@dataclass
class SglangSetup:
    cache: Any
    req_to_token: Any
    allocator: Any
    params: Any

    def run(self, rid: str, prompt: Sequence[int], output: Sequence[int] = (), *, checkpoint: bool = True) -> Any:
        """A finished request whose prompt and output KV sit in its own slots, released like the scheduler does."""
        req = Req(
            rid=rid,
            origin_input_text="",
            origin_input_ids=array("q", prompt),
            sampling_params=SglSamplingParams(temperature=0, max_new_tokens=max(len(output), 1)),
        )
        self.req_to_token.alloc([req])
        tokens = array("q", [*prompt, *output])
        req.output_ids = array("q", output)
        req.full_untruncated_fill_ids = tokens
        slots = self.allocator.alloc(len(tokens))
        assert slots is not None, "pool too small"
        self.req_to_token.write((req.kv.req_pool_idx, slice(0, len(tokens))), slots)
        req.extend_end = len(tokens)
        req.kv.kv_committed_len = req.kv.kv_allocated_len = len(tokens)
        req.last_node = self.cache.root_node_handle()
        req.kv.cache_protected_len = 0
        req.lock = None
        req.finished_reason = FINISH_LENGTH(length=len(output))
        release_kv_cache(req, self.cache, checkpoint=checkpoint)
        return req


def _server_args(**overrides: Any) -> ServerArgs:
    args = ServerArgs(model_path="dummy", page_size=1, **overrides)
    set_global_server_args_for_scheduler(args)
    return args


def make_sglang(kind: str, backend: str | None = None, *, size: int = 64, disable: bool = False) -> SglangSetup:
    """``kind`` is ``"radix"`` (classic ``RadixCache``) or ``"unified"``; ``backend`` picks the unified TreeCore."""
    _server_args()
    req_to_token = ReqToTokenPool(size=8, max_context_len=128, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(
        size=size,
        page_size=1,
        dtype=torch.bfloat16,
        head_num=1,
        head_dim=8,
        layer_num=1,
        device="cpu",
        enable_memory_saver=False,
    )
    allocator = TokenToKVPoolAllocator(size=size, dtype=torch.bfloat16, device="cpu", kvcache=kv, need_sort=False)
    extra: dict[str, Any] = {}
    if kind == "unified":
        extra = {"tree_components": (ComponentType.FULL,), "tree_core_backend": backend}
    params = CacheInitParams(
        disable=disable,
        req_to_token_pool=req_to_token,
        token_to_kv_pool_allocator=allocator,
        page_size=1,
        enable_kv_cache_events=True,
        **extra,
    )
    cache = UnifiedRadixCache(params) if kind == "unified" else RadixCache(params)
    return SglangSetup(cache, req_to_token, allocator, params)


def enable_cpu_hicache(setup: SglangSetup, monkeypatch: Any, write_policy: str = "write_through") -> None:
    """Attach the real HiCache host tier to a unified cache, with the CPU stand-ins above."""
    import sglang.srt.mem_cache.pool_host.common as host_common
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    monkeypatch.setattr(host_common, "_cuda_host_register", lambda *args, **kwargs: None)
    monkeypatch.setattr(MHATokenToKVPoolHost, "backup_from_device_all_layer", lambda self, *args, **kwargs: None)
    args = _server_args(
        hicache_io_backend="direct",
        hicache_mem_layout="layer_first",
        hicache_write_policy=write_policy,
        hicache_ratio=2.0,
    )
    setup.cache.init_hicache(args, setup.params)
    setup.cache.write_through_threshold = 1
