"""Model configuration: frozen, documented, validated dataclasses.

`ModelConfig` is the single description of a DeepSeek-family model. It builds from the nested
dictionaries of ml_collections experiment configs (`from_dict`); HuggingFace `config.json`
conversion lives in dsjax.checkpoint.hf_config (`from_hf` / `to_hf`, keyed by model_type), as
this module imports nothing from the rest of dsjax. Validation messages say what to change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
_TOPK_ALIASES = {"group_limited": "group_limited_greedy"}
_DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("auto", "dense", "blocked", "ragged", "pallas", "ep")
ATTENTION_IMPLS = ("auto", "dense", "blocked", "pallas", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# Feed-forward kinds with routed experts (ModelConfig.moe's).
ROUTED_FFNS = ("moe", "hash_moe")
# ModelConfig.attention: every layer's kind when layer_pattern is empty, and the MTP block's.
MODEL_ATTENTIONS = ("mla", "nsa", "dsa", "v4_sliding", "v4_csa", "v4_hca")


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding, optionally YaRN-scaled (DeepSeek-V2/V3 use YaRN).

  Attributes:
    theta: base wavelength of the rotary frequencies.
    type: "default" (plain RoPE) or "yarn".
    factor: YaRN context-extension factor s.
    original_max_position_embeddings: pre-extension context length the model was trained at.
    beta_fast: YaRN high-frequency boundary (rotations), 32 in DeepSeek.
    beta_slow: YaRN low-frequency boundary (rotations), 1 in DeepSeek.
    mscale: YaRN magnitude scale for the rotary part (cos/sin are multiplied by
      mscale(factor, mscale) / mscale(factor, mscale_all_dim)).
    mscale_all_dim: magnitude scale applied to the softmax scale as mscale(factor, m)^2.
    interleave: rotary pairs are adjacent dims (x0,x1),(x2,x3)... as in DeepSeek's reference;
      False uses the half-split (rotate_half) layout.
  """

  theta: float = 10000.0
  type: Literal["default", "yarn"] = "default"
  factor: float = 1.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0
  interleave: bool = True

  def __post_init__(self):
    _check(self.type in ("default", "yarn"),
           f"rope.type={self.type!r} is not supported; use 'default' or 'yarn'.")
    _check(self.theta > 0, f"rope.theta={self.theta} must be > 0.")
    if self.type == "yarn":
      _check(self.factor >= 1.0, f"rope.factor={self.factor} must be >= 1 for YaRN.")
      _check(self.original_max_position_embeddings > 0,
             "rope.original_max_position_embeddings must be > 0 for YaRN.")
      _check(self.beta_fast > self.beta_slow > 0,
             f"rope.beta_fast={self.beta_fast} must exceed rope.beta_slow={self.beta_slow} > 0.")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Multi-head Latent Attention dimensions.

  Attributes:
    q_lora_rank: rank of the query down-projection (wq_a -> q_norm -> wq_b); None projects
      queries directly with wq (DeepSeek-V2-Lite, Moonlight).
    kv_lora_rank: C, width of the normalised KV latent that the decode cache stores.
    qk_nope_head_dim: per-head query/key dims without rotary embedding.
    qk_rope_head_dim: R, per-head rotary dims; the rotary key is one shared head.
    v_head_dim: per-head value dims.
    attention_impl: how the training / prefill forward computes softmax attention (one
      math, tested equal; docs/attention.md): "dense" (the [B,N,T,S] logits; the reference),
      "blocked" (XLA flash attention: online softmax over key blocks, backward recomputed
      from the log-sum-exp; memory O(T x block); any backend), "pallas" (the Mosaic TPU
      kernel of pallas_kernels.attention; its interpreter on CPU, for tests only), "cudnn"
      (cuDNN's fused attention; NVIDIA GPUs, bf16/fp16) or "auto" (pallas on TPU, cudnn on
      GPU where it applies and blocked otherwise, on CPU dense for T*S below
      dsjax.ops.attention.DENSE_MAX_LOGITS and blocked above). A runtime choice, not part
      of the architecture: not in HF config.json. Decoding's latent attention is unaffected.
  """

  q_lora_rank: int | None = None
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  attention_impl: Literal["auto", "dense", "blocked", "pallas", "cudnn"] = "auto"

  def __post_init__(self):
    _check(self.q_lora_rank is None or self.q_lora_rank > 0,
           f"mla.q_lora_rank={self.q_lora_rank} must be positive, or None for a direct query.")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
      _check(getattr(self, name) > 0, f"mla.{name}={getattr(self, name)} must be > 0.")
    _check(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
           f"mla.qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number "
           "(rotary dims come in pairs).")
    _check(self.attention_impl in ATTENTION_IMPLS,
           f"mla.attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}.")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim


NSA_SELECT_IMPLS = ("auto", "gather", "pallas")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """Native Sparse Attention (Yuan et al. 2025): GQA with compression, selection and
  sliding-window branches mixed by per-head sigmoid gates. Defaults are the paper's.

  Attributes:
    num_kv_heads: KV heads; num_attention_heads must be a multiple (G query heads per group).
    head_dim: query/key dims per head (all rotary).
    v_head_dim: value dims per head.
    compress_block: l, tokens per compressed block.
    compress_stride: d, stride between compressed blocks (divides l and select_block).
    compress_hidden: hidden width of the compression MLP phi.
    select_block: l', tokens per selection block.
    num_selected: n, selection blocks per query (the first block and the 2 local blocks
      included).
    window: w, tokens of the sliding window (the query's own token included).
    select_impl: "gather" (XLA: a gather of the selected blocks, the sliding window and
      compression in blocks; CPU), "pallas" (the pallas_kernels.nsa kernel for all three
      branches; interpreted on CPU) or "auto" (gather on CPU, pallas elsewhere).
    query_chunk: 0 (whole sequences) or queries per chunk, which bounds memory at long
      context: "gather" runs every branch in rematerialised chunks of this many queries,
      "pallas" computes the selection scores in such chunks (the kernels take whole
      sequences).
  """

  num_kv_heads: int = 1
  head_dim: int = 64
  v_head_dim: int = 64
  compress_block: int = 32
  compress_stride: int = 16
  compress_hidden: int = 128
  select_block: int = 64
  num_selected: int = 16
  window: int = 512
  select_impl: Literal["auto", "gather", "pallas"] = "auto"
  query_chunk: int = 0

  def __post_init__(self):
    for name in ("num_kv_heads", "head_dim", "v_head_dim", "compress_block", "compress_stride",
                 "compress_hidden", "select_block", "window"):
      _check(getattr(self, name) > 0, f"nsa.{name}={getattr(self, name)} must be > 0.")
    _check(self.head_dim % 2 == 0, f"nsa.head_dim={self.head_dim} must be even (rotary pairs).")
    _check(self.compress_block % self.compress_stride == 0
           and self.select_block % self.compress_stride == 0,
           f"nsa.compress_stride={self.compress_stride} must divide compress_block="
           f"{self.compress_block} and select_block={self.select_block}.")
    _check(self.num_selected >= 3,
           f"nsa.num_selected={self.num_selected}; use >= 3 (the first block and the 2 local "
           "blocks are always selected).")
    _check(self.select_impl in NSA_SELECT_IMPLS,
           f"nsa.select_impl={self.select_impl!r}; use one of {NSA_SELECT_IMPLS}.")
    _check(self.query_chunk >= 0,
           f"nsa.query_chunk={self.query_chunk}; use 0 (whole sequences) or a positive "
           "number of queries.")


DSA_IMPLS = ("auto", "gather", "pallas", "dense")


@dataclasses.dataclass(frozen=True)
class DSAConfig:
  """DeepSeek Sparse Attention (DeepSeek-V3.2): a lightning indexer picks, per query, the
  index_topk earlier tokens that MLA then attends to. Defaults are DeepSeek-V3.2-Exp's.

  Attributes:
    index_n_heads: indexer query heads (H_I).
    index_head_dim: indexer query/key dims (D_I); the first qk_rope_head_dim are rotary.
    index_topk: tokens each query attends to (k); sequences of at most k tokens are dense MLA.
    impl: "auto" (the default: "pallas" on TPU and GPU, "gather" on CPU), "gather" (each
      query reads its k selected latents, MLA absorbed, in XLA), "pallas" (the same in
      pallas_kernels.dsa's TPU / GPU kernels; their interpreter on CPU, for tests) or "dense"
      (the reference: the selection as a mask on MLA's expanded attention).
    index_precision: "exact" (float32 scores) or "fp8" (DeepSeek's deployed indexer: queries
      and keys rotated by a Hadamard matrix and quantised to e4m3 with power-of-two scales per
      128 channels before scoring; the selection then matches DeepSeek's kernels).
  """

  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 2048
  impl: Literal["auto", "gather", "pallas", "dense"] = "auto"
  index_precision: Literal["exact", "fp8"] = "exact"

  def __post_init__(self):
    for name in ("index_n_heads", "index_head_dim", "index_topk"):
      _check(getattr(self, name) > 0, f"dsa.{name}={getattr(self, name)} must be > 0.")
    _check(self.impl in DSA_IMPLS, f"dsa.impl={self.impl!r}; use one of {DSA_IMPLS}.")
    _check(self.index_precision in ("exact", "fp8"),
           f"dsa.index_precision={self.index_precision!r}; use 'exact' or 'fp8'.")
    _check(self.index_precision == "exact" or not self.index_head_dim & (self.index_head_dim - 1),
           f"dsa.index_precision='fp8' rotates by a Hadamard matrix, which needs a power-of-two "
           f"dsa.index_head_dim (not {self.index_head_dim}; DeepSeek-V3.2: 128).")


@dataclasses.dataclass(frozen=True)
class V4AttentionConfig:
  """DeepSeek-V4's attention (the kinds v4_sliding, v4_csa, v4_hca of dsjax.model.
  v4_attention): queries through a q latent, ONE key-value head of head_dim (K = V) over the
  last sliding_window tokens plus compressed entries of earlier windows, a learned sink logit
  per head, and a grouped output projection. Defaults are DeepSeek-V4-Flash's.

  Attributes:
    head_dim: the query heads' and the single K = V head's dims.
    qk_rope_head_dim: trailing rotary dims of each head (interleaved pairs).
    q_lora_rank: the query latent (wq_a -> q_norm -> wq_b).
    o_groups / o_lora_rank: heads split in o_groups groups, each projected to o_lora_rank
      (wo_a, block-diagonal), then wo_b to hidden.
    sliding_window: keys each query sees uncompressed, itself included.
    csa_rate: tokens per compressed entry in CSA layers (windows of 2 * csa_rate, stride
      csa_rate); hca_rate: tokens per entry in HCA layers (non-overlapping).
    compress_rope: the rotary embedding of CSA / HCA layers and their compressed entries and
      indexer (sliding layers use ModelConfig.rope); V4: theta 160000 (YaRN factor 16 in the
      released checkpoints, without a magnitude factor: mscale = mscale_all_dim).
    index_n_heads / index_head_dim / index_topk: CSA's lightning indexer over its own
      compressed keys of index_head_dim: each query attends to its index_topk best entries.
  """

  head_dim: int = 512
  qk_rope_head_dim: int = 64
  q_lora_rank: int = 1024
  o_groups: int = 8
  o_lora_rank: int = 1024
  sliding_window: int = 128
  csa_rate: int = 4
  hca_rate: int = 128
  compress_rope: RopeConfig = dataclasses.field(
      default_factory=lambda: RopeConfig(theta=160000.0))
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 512

  def __post_init__(self):
    if isinstance(self.compress_rope, dict):
      object.__setattr__(self, "compress_rope", RopeConfig(**self.compress_rope))
    for name in ("head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                 "sliding_window", "csa_rate", "hca_rate", "index_n_heads", "index_head_dim",
                 "index_topk"):
      _check(getattr(self, name) > 0, f"v4.{name}={getattr(self, name)} must be > 0.")
    _check(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim <= self.head_dim,
           f"v4.qk_rope_head_dim={self.qk_rope_head_dim} must be even and <= v4.head_dim="
           f"{self.head_dim} (DeepSeek-V4: 64 of 512).")
    _check(self.qk_rope_head_dim <= self.index_head_dim,
           f"v4.qk_rope_head_dim={self.qk_rope_head_dim} exceeds v4.index_head_dim="
           f"{self.index_head_dim}; the indexer rotates the same trailing dims.")


@dataclasses.dataclass(frozen=True)
class HyperConnectionsConfig:
  """Manifold-constrained hyper-connections (mHC, DeepSeek-V4): the residual is `hc_mult`
  streams mixed around every sublayer by doubly-stochastic matrices (dsjax.ops.
  hyper_connections). Defaults are DeepSeek-V4's.

  Attributes:
    hc_mult: streams (n); 1 keeps one stream with learned gates.
    sinkhorn_iters: Sinkhorn rounds projecting each mixing matrix (the first is a column
      normalisation only).
    eps: added to the input gates, the softmaxed mixing matrix and every Sinkhorn sum
      (0 is allowed: the gates then reach 1 exactly and n = 1 can be the plain residual).
    init_scale: initial value of each sublayer's three gate scales (pre, post, comb), which
      multiply the stream-dependent part of the gates. Small values start training from the
      static bases (the hyper-connection papers' choice): 0.01 trains configs/tiny_mhc.py to
      the plain residual's loss, 1.0 (transformers' initialiser) 0.2 nats above it
      (docs/v4.md). Checkpoints carry their own scales.
  """

  hc_mult: int = 4
  sinkhorn_iters: int = 20
  eps: float = 1e-6
  init_scale: float = 0.01

  def __post_init__(self):
    _check(self.hc_mult >= 1, f"mhc.hc_mult={self.hc_mult} must be >= 1 (DeepSeek-V4: 4).")
    _check(self.sinkhorn_iters >= 1,
           f"mhc.sinkhorn_iters={self.sinkhorn_iters} must be >= 1 (DeepSeek-V4: 20).")
    _check(self.eps >= 0, f"mhc.eps={self.eps} must be >= 0 (DeepSeek-V4: 1e-6).")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE: shared experts plus fine-grained routed experts.

  Attributes:
    n_routed_experts: E, routed experts per MoE layer.
    n_shared_experts: experts every token uses; fused into one MLP of width
      n_shared_experts * moe_intermediate_size.
    num_experts_per_tok: K, routed experts chosen per token.
    moe_intermediate_size: F of each expert's SwiGLU.
    n_group: expert groups for group-limited routing (1 = no grouping).
    topk_group: groups a token may route into.
    scoring_func: "sigmoid" (V3), "softmax" (V2) or "sqrtsoftplus" (V4: sqrt(softplus(logit)))
      router scores.
    topk_method: "greedy" (plain top-k), "group_limited_greedy" (V2: group score = max) or
      "noaux_tc" (V3: group score = sum of top-2 biased scores; bias for selection only).
    norm_topk_prob: renormalise the K chosen weights to sum to 1.
    routed_scaling_factor: multiplier on the routed-expert weights.
    first_k_dense_replace: the first k layers use a dense MLP instead of MoE.
    moe_layer_freq: after those, layer i is a MoE layer when i % moe_layer_freq == 0 and
      dense otherwise (HuggingFace DeepseekV2's rule; 1 = every later layer).
    impl: dispatch implementation, all exact (dropless): "dense" (every expert on every token,
      masked; fastest on CPU for few tokens, as in decoding), "blocked" (sorted by expert,
      padded to row blocks, batched einsum; for CPU training and prefill), "ragged" (sorted
      by expert + lax.ragged_dot, for TPU/GPU), "pallas" (sorted by expert + the Pallas gmm
      kernel of pallas_kernels.gmm on TPU/GPU; its interpreter on CPU, for tests only), or
      "auto" (on CPU dense or blocked by the token count, see
      dsjax.model.moe.resolve_impl; ragged elsewhere), or "ep": expert parallelism over the
      mesh's `expert` axis (dsjax.parallel.expert_parallel: rows travel by all-to-all to the
      device holding their expert), which "auto" picks whenever the step's mesh has
      expert > 1.
    capacity_factor: expert parallelism only: 0 (dropless, the default) or the rows a device
      receives per layer, as a multiple of its tokens x K; rows past that are dropped (the
      train metrics report moe_dropped_fraction).
    swiglu_limit: 0 (no clamp) or the clamp of every routed and shared expert's SwiGLU
      (DeepSeek-V4: 10): silu(min(gate, limit)) * clip(up, -limit, limit).
  """

  n_routed_experts: int = 64
  n_shared_experts: int = 2
  num_experts_per_tok: int = 6
  moe_intermediate_size: int = 1408
  n_group: int = 1
  topk_group: int = 1
  scoring_func: Literal["sigmoid", "softmax", "sqrtsoftplus"] = "softmax"
  topk_method: TopkMethod = "greedy"
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  first_k_dense_replace: int = 1
  moe_layer_freq: int = 1
  impl: Literal["auto", "dense", "blocked", "ragged", "pallas", "ep"] = "auto"
  capacity_factor: float = 0.0
  swiglu_limit: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "topk_method", _TOPK_ALIASES.get(self.topk_method, self.topk_method))
    _check(self.scoring_func in ("sigmoid", "softmax", "sqrtsoftplus"),
           f"moe.scoring_func={self.scoring_func!r}; use 'sigmoid', 'softmax' or "
           "'sqrtsoftplus'.")
    _check(self.swiglu_limit >= 0,
           f"moe.swiglu_limit={self.swiglu_limit}; use 0 (no clamp) or a positive limit "
           "(DeepSeek-V4: 10).")
    _check(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
           f"moe.topk_method={self.topk_method!r}; use 'greedy', 'group_limited_greedy' or "
           "'noaux_tc'.")
    _check(self.impl in MOE_IMPLS, f"moe.impl={self.impl!r}; use one of {MOE_IMPLS}.")
    _check(self.capacity_factor == 0 or self.capacity_factor >= 1.0 / self.num_experts_per_tok,
           f"moe.capacity_factor={self.capacity_factor}; use 0 (dropless) or a positive "
           f"multiple of the rows a device routes (>= 1/K; 1.0 to 2.0 is usual).")
    _check(self.n_routed_experts > 0 and self.moe_intermediate_size > 0,
           "moe.n_routed_experts and moe.moe_intermediate_size must be > 0.")
    _check(self.n_shared_experts >= 0, "moe.n_shared_experts must be >= 0.")
    _check(0 < self.num_experts_per_tok <= self.n_routed_experts,
           f"moe.num_experts_per_tok={self.num_experts_per_tok} must be in "
           f"[1, n_routed_experts={self.n_routed_experts}].")
    _check(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
           f"moe.n_routed_experts={self.n_routed_experts} is not divisible by "
           f"moe.n_group={self.n_group}; pick n_group dividing the expert count.")
    _check(1 <= self.topk_group <= self.n_group,
           f"moe.topk_group={self.topk_group} must be in [1, n_group={self.n_group}].")
    per_group = self.n_routed_experts // self.n_group
    if self.topk_method != "greedy":
      _check(self.topk_group * per_group >= self.num_experts_per_tok,
             f"moe.topk_group={self.topk_group} groups of {per_group} experts cannot supply "
             f"num_experts_per_tok={self.num_experts_per_tok}; raise topk_group.")
    if self.topk_method == "noaux_tc":
      _check(per_group >= 2, "moe.topk_method='noaux_tc' scores a group by its top-2 experts; "
             "each group needs >= 2 experts (lower n_group).")
    _check(self.first_k_dense_replace >= 0, "moe.first_k_dense_replace must be >= 0.")
    _check(self.moe_layer_freq >= 1, f"moe.moe_layer_freq={self.moe_layer_freq}; use >= 1.")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One decoder layer: the names of its attention kind and feed-forward kind, as registered
  in dsjax.model.kinds ("mla", "nsa"; "dense", "moe")."""

  attention: str = "mla"
  ffn: str = "dense"

  def __post_init__(self):
    _check(isinstance(self.attention, str) and isinstance(self.ffn, str),
           f"LayerSpec({self.attention!r}, {self.ffn!r}): both kinds are names (strings).")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A DeepSeek-family decoder (V2, V3/R1, Moonlight).

  Attributes:
    vocab_size: V.
    hidden_size: D, model width.
    num_hidden_layers: decoder layers of the main model (MTP modules not included).
    num_attention_heads: N.
    intermediate_size: F of the dense SwiGLU MLP (first_k_dense_replace layers).
    attention: "mla" (Multi-head Latent Attention, DeepSeek-V2/V3), "nsa" (Native Sparse
      Attention, GQA-based; dims in `nsa`) or "dsa" (DeepSeek Sparse Attention, V3.2).
    mla: MLA dimensions (unused by NSA layers).
    nsa: NSA dimensions and block sizes; defaults to NSAConfig() when attention="nsa".
    dsa: the DSA indexer (attention="dsa", DeepSeek-V3.2: MLA over the indexer's top-k
      tokens); defaults to DSAConfig() then.
    rope: rotary embedding.
    mhc: the residual: None for the plain pre-norm residual of V2/V3, or mHC's streams
      (DeepSeek-V4; any model may use them).
    v4: DeepSeek-V4's attention dims, read by the v4_* attention kinds (their defaults when
      None).
    moe: routed experts; None makes every layer dense.
    num_mtp_layers: multi-token-prediction modules (DeepSeek-V3 has 1).
    max_position_embeddings: longest sequence the model accepts.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: share the input embedding with the output head.
    initializer_range: std of the normal initialiser.
    bos_token_id / eos_token_id: special token ids (eos may be a tuple).
    dtype: activation/compute dtype; param_dtype: parameter storage dtype.
    scan_layers: run each layer stack with lax.scan (False unrolls; results are equal).
    remat_policy: activation checkpointing per layer: "none", "full", "dots",
      "dots_with_no_batch_dims".
    layer_pattern: one LayerSpec per layer (attention kind, feed-forward kind), or () to
      derive it: `attention` for every layer, and the MoE layers from
      moe.first_k_dense_replace and moe.moe_layer_freq (see `layer_specs`).
  """

  vocab_size: int = 102400
  hidden_size: int = 2048
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  intermediate_size: int = 10944
  attention: str = "mla"
  mla: MLAConfig = dataclasses.field(default_factory=MLAConfig)
  nsa: NSAConfig | None = None
  dsa: DSAConfig | None = None
  rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
  mhc: HyperConnectionsConfig | None = None
  v4: V4AttentionConfig | None = None
  moe: MoEConfig | None = dataclasses.field(default_factory=MoEConfig)
  num_mtp_layers: int = 0
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  layer_pattern: tuple[LayerSpec, ...] = ()

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings"):
      _check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0.")
    _check(self.num_mtp_layers >= 0, "num_mtp_layers must be >= 0.")
    _check(self.rms_norm_eps > 0, "rms_norm_eps must be > 0.")
    _check(self.dtype in _DTYPES and self.param_dtype in _DTYPES,
           f"dtype={self.dtype!r}, param_dtype={self.param_dtype!r}; use one of {_DTYPES}.")
    _check(self.remat_policy in REMAT_POLICIES,
           f"remat_policy={self.remat_policy!r}; use one of {REMAT_POLICIES}.")
    _check(self.attention in MODEL_ATTENTIONS,
           f"attention={self.attention!r}; use one of {MODEL_ATTENTIONS} (or name other "
           "registered kinds per layer in layer_pattern).")
    if self.attention == "nsa" and self.nsa is None:
      object.__setattr__(self, "nsa", NSAConfig())
    if self.attention == "dsa" and self.dsa is None:
      object.__setattr__(self, "dsa", DSAConfig())
    for name, cls in (("mla", MLAConfig), ("rope", RopeConfig), ("moe", MoEConfig),
                      ("nsa", NSAConfig), ("dsa", DSAConfig), ("mhc", HyperConnectionsConfig),
                      ("v4", V4AttentionConfig)):
      value = getattr(self, name)
      _check(isinstance(value, cls) or (name in ("moe", "nsa", "dsa", "mhc", "v4")
                                        and value is None),
             f"{name}={value!r} must be a {cls.__name__}; build nested dicts with "
             "ModelConfig.from_dict.")
    if self.attention == "nsa":
      _check(self.num_attention_heads % self.nsa.num_kv_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of "
             f"nsa.num_kv_heads={self.nsa.num_kv_heads}; NSA needs whole GQA groups.")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.moe is not None:
      _check(self.moe.first_k_dense_replace <= self.num_hidden_layers,
             f"moe.first_k_dense_replace={self.moe.first_k_dense_replace} exceeds "
             f"num_hidden_layers={self.num_hidden_layers}; lower first_k_dense_replace or "
             "add layers.")
    if self.layer_pattern:
      pattern = tuple(LayerSpec(**s) if isinstance(s, dict) else s for s in self.layer_pattern)
      object.__setattr__(self, "layer_pattern", pattern)
      _check(all(isinstance(s, LayerSpec) for s in pattern),
             "layer_pattern holds LayerSpec(attention=..., ffn=...) entries (or such dicts).")
      _check(len(pattern) == self.num_hidden_layers,
             f"layer_pattern has {len(pattern)} layers but num_hidden_layers="
             f"{self.num_hidden_layers}; give one LayerSpec per layer.")
      _check(self.moe is not None or all(s.ffn not in ROUTED_FFNS for s in pattern),
             "layer_pattern has 'moe' / 'hash_moe' layers but moe=None; add a moe config or "
             "use 'dense'.")
    if self.rope.type == "yarn":
      _check(self.rope.original_max_position_embeddings <= self.max_position_embeddings,
             f"rope.original_max_position_embeddings={self.rope.original_max_position_embeddings}"
             f" exceeds max_position_embeddings={self.max_position_embeddings}; raise "
             "max_position_embeddings (DeepSeek uses rope.factor * that) or lower the original.")

  # ---- derived sizes ----
  @property
  def layer_specs(self) -> tuple[LayerSpec, ...]:
    """Each layer's (attention kind, feed-forward kind): `layer_pattern`, or derived: layer i
    is MoE when i >= moe.first_k_dense_replace and i % moe.moe_layer_freq == 0."""
    if self.layer_pattern:
      return self.layer_pattern
    moe = self.moe
    return tuple(
        LayerSpec(self.attention, "moe" if moe is not None and i >= moe.first_k_dense_replace
                  and i % moe.moe_layer_freq == 0 else "dense")
        for i in range(self.num_hidden_layers))

  @property
  def mtp_spec(self) -> LayerSpec:
    """The layer inside each MTP module: the model's attention, a MoE feed-forward."""
    return LayerSpec(self.attention, "dense" if self.moe is None else "moe")

  @property
  def num_dense_layers(self) -> int:
    return sum(s.ffn not in ROUTED_FFNS for s in self.layer_specs)

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.num_dense_layers

  @property
  def softmax_scale(self) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = self.mla.qk_head_dim ** -0.5
    if self.rope.type == "yarn" and self.rope.mscale_all_dim:
      m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
      scale *= m * m
    return scale

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- conversions ----
  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Builds from a (possibly nested) dict, e.g. an ml_collections `config.model`."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    _check(not unknown, f"Unknown ModelConfig fields {sorted(unknown)}; check for typos.")
    for key, sub in SUB_CONFIGS.items():
      if isinstance(d.get(key), dict) or hasattr(d.get(key), "to_dict"):
        value = d[key].to_dict() if hasattr(d[key], "to_dict") else dict(d[key])
        bad = set(value) - {f.name for f in dataclasses.fields(sub)}
        _check(not bad, f"Unknown {key} fields {sorted(bad)}; check for typos.")
        d[key] = sub(**value)
    if "layer_pattern" in d:  # lists from JSON / ConfigDicts from ml_collections
      d["layer_pattern"] = tuple(
          s if isinstance(s, LayerSpec) else LayerSpec(**(s.to_dict() if hasattr(s, "to_dict")
                                                          else dict(s)))
          for s in d["layer_pattern"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


SUB_CONFIGS = {"mla": MLAConfig, "rope": RopeConfig, "moe": MoEConfig, "nsa": NSAConfig,
               "dsa": DSAConfig, "mhc": HyperConnectionsConfig, "v4": V4AttentionConfig}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
