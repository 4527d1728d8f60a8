"""MA-LMM: the memory-augmented Q-Former and the frozen-LLM wrapper, in one file, top to bottom.

He et al., "MA-LMM: Memory-Augmented Large Multimodal Model for Long-Term Video Understanding",
CVPR 2024 (arXiv 2404.05726). The model reads a video **online**, one frame at a time:

    frame features f_t (cached ViT hidden states -> vision layer norm + frame position embedding)
        -> Q-Former step t: every cross-attention layer attends to [visual memory bank ; f_t],
           every self-attention layer attends to [its query memory bank ; current hidden states]
        -> append f_t / the layer inputs to the banks, compress a bank that exceeds L slots (MBC)
    after the last frame: the 32 query outputs -> language projection -> frozen LLM
        [32 video tokens][prompt][answer + eos]

Layout of this file:

1. :class:`MALMMConfig` – the paper's options and ablations (memory policy, which banks, L, ...).
2. The Q-Former (:class:`MemoryQFormer`) – a BERT-style encoder whose parameter names are exactly
   those of ``transformers.InstructBlipQFormerModel``, so an InstructBLIP Q-Former state dict
   loads without renaming; extended with the query memory bank in its self-attention.
3. :class:`MALMM` – the trainable parts around the Q-Former (vision layer norm ``ln_vision``,
   frame position embedding, learned queries, language projection), the frozen LLM, the
   streaming API ``init_state / step / readout`` and ``forward`` (training loss) / ``generate``.

The memory banks and memory bank compression live in :mod:`pipeline.model.memory`; loading
weights (HF InstructBLIP, our checkpoints, LAVIS / MA-LMM releases) in
:mod:`pipeline.model.checkpoint`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from pipeline.model.memory import POLICIES, MemoryState, push

AGGREGATIONS = ("memory", "concat", "avgpool")
#: ``MALMMConfig.memory``: the bank policies of :mod:`pipeline.model.memory` and the reference's
#: no-memory path ``per_frame`` (its ``memory_bank_length = 0``)
MEMORY_MODES = POLICIES + ("per_frame",)
#: epsilon of LAVIS' ``ln_vision`` (a ``torch.nn.LayerNorm`` with its default epsilon); HF
#: InstructBLIP's ``post_layernorm`` uses the vision config's ``layer_norm_eps`` (1e-6)
LAVIS_LN_VISION_EPS = 1e-5


# ----------------------------------------------------------------------------- 1. configuration

#: the narrowest vision features for which ``MALMMConfig.memory_kv_cache=None`` keeps the banks'
#: keys and values. Caching trades projections for copies of a cache two to four times the bank's
#: size. Measured on a CPU, 1 thread (tests/perf/bench_kv_cache.py): the real Q-Former (1408-wide
#: ViT-g features, 257 tokens, 12 layers) read one video of 24 frames x2.3 (L = 10) and x3.0 (L = 20)
#: faster with it; a training step of the tiny default (64 wide, 17 tokens, 4 layers) ran x0.93 as
#: fast with MBC, x0.99 with FIFO. At 256 wide (tests/perf/bench_model.py's mid-size model) a
#: 1000-frame video took 34.3 s with it against 36.7 s without (separate runs) and twice the peak
#: memory (85 against 41 MB, constant in frames either way): not worth it below 512.
KV_CACHE_MIN_WIDTH = 512

FRAME_POSITION_INITS = ("zeros", "sinusoidal")
LOSS_REDUCTIONS = ("token", "sample")
#: amplitude of the sinusoidal frame position table. A LayerNorm'd frame token has unit RMS per
#: channel; rows of amplitude 3 dominate it, so attention can tell stored frames apart by position
#: from the first step (measured on the synthetic benchmark: amplitude 1 left "what colour was the
#: first object?" at chance after 250 steps, amplitude 3 reached 98 %).
SINUSOIDAL_AMPLITUDE = 3.0


def sinusoidal_table(rows: int, width: int, amplitude: float = SINUSOIDAL_AMPLITUDE) -> torch.Tensor:
    """``[rows, width]``: row t = ``amplitude`` · sin / cos of t at geometrically spaced frequencies."""
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float32) / width)
    table = torch.zeros(rows, width)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : width // 2]
    return amplitude * table


@dataclass
class MALMMConfig:
    """The MA-LMM options on top of a base InstructBLIP model (which fixes all widths).

    Attributes:
        memory: memory bank policy, ``mbc`` (memory bank compression, the paper's method),
            ``fifo`` (drop the oldest slot) or ``none`` (no memory: the answer sees the last frame
            only); or ``per_frame``, the reference code's no-memory path (its ``memory_bank_length
            = 0``): every frame goes through the Q-Former on its own (with the instruction, without
            any bank and without the frame position embedding) and the T x Nq query outputs of all
            frames, in frame order, are the LLM's video tokens. ``per_frame`` needs ``aggregation
            = "memory"``; ``visual_memory``, ``query_memory`` and ``memory_length`` do not apply,
            and ``max_frames`` does not bound it (no position table is read).
        visual_memory: use the visual memory bank in cross-attention (ablation: visual memory only / off).
        query_memory: use the query memory banks in self-attention (ablation: query memory only / off).
        memory_length: L, the number of slots a bank keeps between steps.
        max_frames: rows of the learned frame position embedding table; more frames per video than
            this is an error.
        aggregation: ``memory`` (MA-LMM), or the memory-less baselines of Table 8: ``concat``
            (all frames' features concatenated into cross-attention) and ``avgpool`` (frame
            features averaged over time).
        num_query_tokens: learned queries; None = as in the base model (32 for InstructBLIP).
        max_prompt_tokens: LLM prompt tokens kept (left truncation), as LAVIS' ``max_txt_len``;
            also the Q-Former instruction length limit (special tokens included), truncated from the
            left as well, as the reference's Q-Former tokenizer (``truncation_side="left"``): a long
            instruction keeps its end, where the question is.
        max_target_tokens: LLM target tokens kept including eos (LAVIS' ``max_output_txt_len``).
        no_grad_prefix: run steps 0..T-2 without autograd in training; memory is detached, so the
            gradients are identical and no activations are kept for those steps.
        memory_kv_cache: without autograd (the no-grad prefix, inference), keep each bank slot's
            attention keys and values from when it was stored instead of projecting every slot again
            at every step (exact: MBC's weighted mean commutes with the affine projections; the
            outputs agree to float rounding). False: the reference code's recomputation. None (the
            default): on for vision features at least :data:`KV_CACHE_MIN_WIDTH` wide.
        frame_position_init: initial frame position embedding when the checkpoint has none:
            ``zeros`` (the paper's code: an InstructBLIP checkpoint starts as itself) or
            ``sinusoidal`` (sin/cos rows of amplitude :data:`SINUSOIDAL_AMPLITUDE`). Memory is detached, so PE(t)
            of the frames stored in memory (t < T-1) never receives a gradient: from zeros, the
            memory banks carry no frame order at all; sinusoidal rows keep the order readable.
        loss_reduction: ``token`` (the reference's: the mean over every target token of the batch) or
            ``sample`` (the mean over samples of each sample's mean token loss, so that in a batch that
            mixes tasks a 20-token caption weighs as much as a one-word answer, not 20 times more).
        ln_vision_eps: epsilon of the vision layer norm ``ln_vision``; None = the base model's
            ``vision_config.layer_norm_eps`` (1e-6 for HF InstructBLIP). Weights imported from a LAVIS /
            MA-LMM release run with LAVIS' own :data:`LAVIS_LN_VISION_EPS` (1e-5), which
            :func:`pipeline.model.checkpoint.load_checkpoint` records here.
    """

    memory: str = "mbc"
    visual_memory: bool = True
    query_memory: bool = True
    memory_length: int = 20
    max_frames: int = 120
    aggregation: str = "memory"
    num_query_tokens: int | None = None
    max_prompt_tokens: int = 128
    max_target_tokens: int = 256
    no_grad_prefix: bool = True
    memory_kv_cache: bool | None = None
    frame_position_init: str = "zeros"
    loss_reduction: str = "token"
    ln_vision_eps: float | None = None

    def __post_init__(self):
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.memory == "per_frame" and self.aggregation != "memory":
            raise ValueError(f"memory='per_frame' (every frame through the Q-Former alone) cannot be combined "
                             f"with aggregation={self.aggregation!r}; use aggregation='memory' (the default)")
        if self.ln_vision_eps is not None and not float(self.ln_vision_eps) > 0:
            raise ValueError(f"ln_vision_eps must be > 0 (or None for the base model's), got {self.ln_vision_eps}")
        if int(self.memory_length) < 1:
            raise ValueError(f"memory_length (L) must be >= 1, got {self.memory_length}")
        if int(self.max_frames) < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if self.frame_position_init not in FRAME_POSITION_INITS:
            raise ValueError(f"frame_position_init must be one of {FRAME_POSITION_INITS}, "
                             f"got {self.frame_position_init!r}")

    def policy(self, bank: str) -> str:
        """Effective policy of the ``visual`` or ``query`` bank (``none`` when that bank is off)."""
        enabled = self.visual_memory if bank == "visual" else self.query_memory
        if self.memory == "per_frame":
            return "none"
        return self.memory if enabled and self.aggregation == "memory" else "none"

    @property
    def collects_frames(self) -> bool:
        """True when ``step`` only collects the frames and ``readout`` runs the Q-Former over them
        (``concat`` / ``avgpool`` aggregation and the ``per_frame`` memory mode)."""
        return self.aggregation != "memory" or self.memory == "per_frame"


# ----------------------------------------------------------------------------- 2. the Q-Former

class QFormerMultiHeadAttention(nn.Module):
    """Scaled dot-product attention; queries from ``hidden_states``, keys and values from ``context``.

    For self-attention with a query memory bank, ``context`` = [bank ; current hidden states];
    for cross-attention, ``context`` = [visual memory bank ; current frame] (width ``encoder_hidden_size``).
    A bank can come instead as its keys and values, ``memory_kv``, computed once when its slots
    were stored (``Bank.cache``); ``context`` is then the current tokens only.
    """

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden size {config.hidden_size} is not a multiple of "
                             f"{config.num_attention_heads} attention heads")
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        context_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_width, config.hidden_size)
        self.value = nn.Linear(context_width, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None,
                memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the attended values ``[B, L, D]`` and the keys and values of ``context`` ``[B, K, D]``."""
        B, L, _ = hidden_states.shape
        heads = lambda x: x.view(B, x.shape[1], self.num_heads, self.head_size).transpose(1, 2)  # noqa: E731
        k_ctx, v_ctx = self.key(context), self.value(context)
        k, v = k_ctx, v_ctx
        if memory_kv is not None:
            k, v = torch.cat([memory_kv[0].to(k.dtype), k], dim=1), torch.cat([memory_kv[1].to(v.dtype), v], dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, K], True = attend
        out = F.scaled_dot_product_attention(heads(self.query(hidden_states)), heads(k), heads(v), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_size), (k_ctx, v_ctx)


class QFormerSelfOutput(nn.Module):
    """Attention output projection, dropout, residual and LayerNorm (BERT's ``BertSelfOutput``)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class QFormerAttention(nn.Module):
    """Attention block: ``attention`` (q/k/v) then ``output`` (projection + residual + norm)."""

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = QFormerSelfOutput(config)

    def forward(self, hidden_states, context, key_mask=None, memory_kv=None):
        attended, kv = self.attention(hidden_states, context, key_mask, memory_kv)
        return self.output(attended, hidden_states), kv


class QFormerIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class QFormerOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class QFormerLayer(nn.Module):
    """One Q-Former layer with MA-LMM's memory.

    * self-attention over queries and instruction tokens; keys/values from
      [query memory bank of this layer ; current hidden states] (the query memory bank);
    * cross-attention (every ``cross_attention_frequency``-th layer), queries only, to the visual
      context [visual memory bank ; current frame] (the visual memory bank);
    * separate feed-forward networks for the queries (``*_query``) and the instruction tokens.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        self.intermediate = QFormerIntermediate(config)
        self.output = QFormerOutput(config)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config)

    def forward(self, hidden_states: torch.Tensor, self_key_mask: torch.Tensor | None, visual: torch.Tensor,
                num_queries: int, memory: torch.Tensor | None = None, memory_kv=None, visual_kv=None):
        """One layer. The query memory bank comes as its slots ``memory`` or as their keys and values
        ``memory_kv``; the visual bank as part of ``visual`` or as ``visual_kv`` (``visual`` is then
        the current frame only).

        Returns the output hidden states and ``(self_kv, cross_kv)``: the keys and values this layer
        computed for the current hidden states and for ``visual`` (None without cross-attention).
        """
        n = hidden_states.shape[1]
        context = hidden_states if memory is None else torch.cat([memory, hidden_states], dim=1)
        attended, (k, v) = self.attention(hidden_states, context, self_key_mask, memory_kv)
        self_kv = (k[:, -n:], v[:, -n:])
        queries, cross_kv = attended[:, :num_queries], None
        if self.has_cross_attention:
            queries, cross_kv = self.crossattention(queries, visual, None, visual_kv)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if attended.shape[1] != num_queries:
            text = attended[:, num_queries:]
            queries = torch.cat([queries, self.output(self.intermediate(text), text)], dim=1)
        return queries, (self_kv, cross_kv)


class QFormerEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_hidden_layers)])


class QFormerEmbeddings(nn.Module):
    """[learned queries ; instruction word + position embeddings] -> LayerNorm -> dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is not None and input_ids.shape[1] > 0:
            positions = self.position_ids[:, : input_ids.shape[1]]
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
            embeddings = torch.cat([query_embeds.to(text.dtype), text], dim=1)
        else:
            embeddings = query_embeds
        return self.dropout(self.layernorm(embeddings.to(self.layernorm.weight.dtype)))


class MemoryQFormer(nn.Module):
    """InstructBLIP's Q-Former with MA-LMM's query memory: one time step per call.

    Parameter names equal ``transformers.InstructBlipQFormerModel``'s (``embeddings.*``,
    ``encoder.layer.{i}.attention.attention.query`` ...), so its state dict loads as is.
    Built from an ``InstructBlipQFormerConfig``.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = QFormerEncoder(config)

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor, query_memory: list[torch.Tensor | None] | None = None,
                query_memory_kv: list | None = None, visual_kv: list | None = None, return_kv: bool = False):
        """One Q-Former pass.

        Args:
            query_embeds: learned queries ``[B, Nq, D]``.
            input_ids: instruction tokens ``[B, S]`` (Q-Former tokenizer) or None.
            attention_mask: ``[B, Nq + S]`` (1 = real token), as for ``InstructBlipQFormerModel``.
            encoder_hidden_states: the visual context ``[B, K, C]`` (K = (M+1)·P with a visual bank).
            query_memory: per layer, that layer's query memory bank flattened to ``[B, M·(Nq+S), D]``
                (or None): extra keys/values of its self-attention.
            query_memory_kv: per layer, instead of its ``query_memory``, the bank's self-attention keys
                and values ``([B, M·(Nq+S), D], [B, M·(Nq+S), D])`` (or None).
            visual_kv: per layer with cross-attention, the visual bank's keys and values of that
                layer, placed before those of ``encoder_hidden_states`` (which is then the current
                frame only); None elsewhere.
            return_kv: also return, per layer, the keys and values computed for the current hidden
                states (self-attention) and for ``encoder_hidden_states`` (cross-attention, or None).

        Returns:
            ``(last_hidden_state [B, Nq + S, D], layer_inputs)`` where ``layer_inputs[l]`` is the
            input hidden states of layer l — what goes into that layer's query memory bank; with
            ``return_kv`` a third item, the list of ``(self_kv, cross_kv)`` per layer.
        """
        num_queries = query_embeds.shape[1]
        hidden = self.embeddings(query_embeds, input_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if bool(attention_mask.all()):
                attention_mask = None
        visual = encoder_hidden_states.to(hidden.dtype)
        layer_inputs, kvs = [], []
        for i, layer in enumerate(self.encoder.layer):
            memory = query_memory[i] if query_memory is not None else None
            memory_kv = query_memory_kv[i] if query_memory_kv is not None else None
            if memory is not None and memory_kv is not None:
                raise ValueError(f"layer {i}: give its query memory as slots or as keys and values, not both")
            stored = memory.shape[1] if memory is not None else memory_kv[0].shape[1] if memory_kv is not None else 0
            key_mask = attention_mask
            if attention_mask is not None and stored:  # the bank's tokens share the instruction mask
                key_mask = attention_mask.repeat(1, stored // hidden.shape[1] + 1)
            layer_inputs.append(hidden)
            hidden, kv = layer(hidden, key_mask, visual, num_queries,
                               None if memory is None else memory.to(hidden.dtype), memory_kv,
                               visual_kv[i] if visual_kv is not None else None)
            kvs.append(kv)
        return (hidden, layer_inputs, kvs) if return_kv else (hidden, layer_inputs)


# ----------------------------------------------------------------------------- 3. MA-LMM

@dataclass
class MALMMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None = None


class MALMM(nn.Module):
    """MA-LMM on cached ViT features: memory Q-Former + projection + frozen LLM.

    Trainable (as in the paper and its reference code): the Q-Former, its learned queries
    ``query_tokens``, ``language_projection`` (Q-Former -> LLM), the vision layer norm ``ln_vision``
    (HF ``vision_model.post_layernorm``) and the frame position embedding
    ``frame_position_embedding`` ``[max_frames, C]`` (zeros at start as in the paper's code, so an
    InstructBLIP checkpoint starts as itself; or sinusoidal, see ``MALMMConfig.frame_position_init``). Frozen: the LLM (``requires_grad=False``, always in eval mode). The ViT body
    is not part of the module: inputs are its cached hidden states *before* the final layer norm,
    ``features [B, T, P, C]`` in any float dtype.

    One parameter group of the Q-Former is frozen as well: the instruction-token feed-forward of
    the last layer (``encoder.layer[-1].intermediate/output``). Its output reaches neither the LLM
    nor any memory bank (banks store layer *inputs*), so it never receives a gradient; freezing it
    lets DDP run with ``find_unused_parameters=False``.

    Build with :func:`pipeline.model.checkpoint.load_malmm`.
    """

    def __init__(self, config: MALMMConfig, base_config, llm: nn.Module, tokenizer, qformer_tokenizer):
        super().__init__()
        self.config = config
        self.base_config = base_config
        vision_width = base_config.vision_config.hidden_size
        qcfg = base_config.qformer_config
        if qcfg.encoder_hidden_size != vision_width:
            raise ValueError(f"Q-Former encoder_hidden_size {qcfg.encoder_hidden_size} != vision width {vision_width}")
        num_queries = config.num_query_tokens or base_config.num_query_tokens
        if config.num_query_tokens and config.num_query_tokens != base_config.num_query_tokens:
            raise ValueError(f"num_query_tokens={config.num_query_tokens} but the base model has "
                             f"{base_config.num_query_tokens} learned queries")
        self.num_query_tokens = num_queries

        eps = config.ln_vision_eps if config.ln_vision_eps is not None else base_config.vision_config.layer_norm_eps
        self.ln_vision = nn.LayerNorm(vision_width, eps=float(eps))
        pe = (sinusoidal_table(config.max_frames, vision_width) if config.frame_position_init == "sinusoidal"
              else torch.zeros(config.max_frames, vision_width))
        self.frame_position_embedding = nn.Parameter(pe)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, qcfg.hidden_size))
        self.qformer = MemoryQFormer(qcfg)
        self.language_projection = nn.Linear(qcfg.hidden_size, llm.config.hidden_size)
        self.llm = llm
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        if qformer_tokenizer is not None:  # long instructions keep their end, as the reference's tokenizer
            qformer_tokenizer.truncation_side = "left"
        self.base_model_dir: str | None = None  # set by load_malmm; recorded in our checkpoints

        self.llm.requires_grad_(False)
        self.llm.eval()
        last = self.qformer.encoder.layer[-1]
        last.intermediate.requires_grad_(False)
        last.output.requires_grad_(False)

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()  # frozen: no dropout, whatever the wrapper's mode
        return self

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should update (everything but the LLM)."""
        return [p for _, p in self.named_trainable_parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors only, under their ``state_dict`` names (what our checkpoints store)."""
        return {n: p.detach() for n, p in self.named_trainable_parameters()}

    # -- streaming API: init_state / step / readout -----------------------------------------------

    def init_state(self, prompts: list[str]) -> MemoryState:
        """An empty memory for a batch of videos; ``prompts`` are the Q-Former instructions."""
        enc = self.qformer_tokenizer(list(prompts), padding="longest", truncation=True,
                                     max_length=self.config.max_prompt_tokens, return_tensors="pt")
        return self.init_state_from_ids(enc["input_ids"], enc["attention_mask"])

    def init_state_from_ids(self, instruction_ids: torch.Tensor, instruction_mask: torch.Tensor) -> MemoryState:
        layers = len(self.qformer.encoder.layer)
        return MemoryState(instruction_ids=instruction_ids.to(self.device),
                           instruction_mask=instruction_mask.to(self.device),
                           queries=(None,) * layers)

    def _check_frame_count(self, total: int) -> None:
        if self.config.memory == "per_frame":
            return  # no frame position embedding: any number of frames
        if total > self.config.max_frames:
            raise ValueError(
                f"video has more frames ({total}) than max_frames={self.config.max_frames}, the size of the frame "
                f"position embedding table; sample fewer frames or raise max_frames")

    def frame_features(self, features: torch.Tensor, first_frame: int) -> torch.Tensor:
        """f_t = ln_vision(ViT hidden states) + PE(t), for frames ``first_frame ..``; [B, n, P, C]."""
        n = features.shape[1]
        self._check_frame_count(first_frame + n)
        x = self.ln_vision(features.to(device=self.device, dtype=self.ln_vision.weight.dtype))
        return x + self.frame_position_embedding[first_frame:first_frame + n, None, :]

    def step(self, state: MemoryState, features: torch.Tensor) -> MemoryState:
        """Feed the next frames ``features [B, n, P, C]`` (cached ViT states) in order; returns a new state.

        In ``memory`` aggregation each frame is one Q-Former step: cross-attention reads
        [visual bank ; f_t], each self-attention layer reads [its query bank ; current states]; then
        f_t and the layer inputs are appended (detached) and a bank longer than L is reduced by
        the configured policy. The ``concat`` / ``avgpool`` baselines and the ``per_frame`` mode only
        collect frames here and run the Q-Former in :meth:`readout`.
        """
        if features.dim() != 4:
            raise ValueError(f"features must be [B, T, P, C], got shape {tuple(features.shape)}")
        if features.shape[0] != state.batch_size:
            raise ValueError(f"features batch {features.shape[0]} != state batch {state.batch_size}")
        n = features.shape[1]
        if n == 0:
            return state
        self._check_frame_count(state.frames_seen + n)
        if self.config.collects_frames:
            raw = features.to(device=self.device)
            frames = raw if state.frames is None else torch.cat([state.frames, raw.to(state.frames.dtype)], dim=1)
            return state.evolve(frames=frames, frames_seen=state.frames_seen + n)

        cfg = self.config
        if cfg.policy("visual") == "none" and cfg.policy("query") == "none" and n > 1:
            # no memory: a frame leaves nothing behind for later steps, so only the chunk's last
            # frame (at its own position) can reach the readout; the others are not computed
            state = state.evolve(frames_seen=state.frames_seen + n - 1)
            features, n = features[:, -1:], 1
        full_mask = self._qformer_mask(state)
        layers = self.qformer.encoder.layer
        cross = [i for i, layer in enumerate(layers) if layer.has_cross_attention]
        # Without autograd the banks carry their keys and values (Bank.cache): each slot is projected
        # once, when stored, instead of at every later step. With autograd the projections of the
        # stored slots must be recomputed (they are what trains the key/value weights on memory).
        use_cache = (cfg.memory_kv_cache if cfg.memory_kv_cache is not None
                     else self.base_config.vision_config.hidden_size >= KV_CACHE_MIN_WIDTH)
        cached = use_cache and not torch.is_grad_enabled()
        width = self.qformer.config.hidden_size  # of every key and value
        for i in range(n):
            f_t = self.frame_features(features[:, i:i + 1], state.frames_seen)[:, 0]  # [B, P, C]
            vbank = state.visual
            banks = state.queries or (None,) * len(layers)
            if cached:
                vbank = self._with_visual_cache(vbank, cross, f_t.dtype)
                banks = tuple(self._with_query_cache(layer, bank) for layer, bank in zip(layers, banks))
                visual, memory = f_t, None
                visual_kv = [None] * len(layers)
                for j, li in enumerate(cross):
                    if vbank is not None:
                        visual_kv[li] = _split_kv(vbank.cache, j, width)
                memory_kv = [None if bank is None else _split_kv(bank.cache, 0, width) for bank in banks]
            else:
                visual = f_t if vbank is None else torch.cat([vbank.flat().to(f_t.dtype), f_t], dim=1)
                memory = [None if bank is None else bank.flat() for bank in banks]
                visual_kv = memory_kv = None
            hidden, layer_inputs, kvs = self.qformer(self.query_tokens.expand(state.batch_size, -1, -1),
                                                     state.instruction_ids, full_mask, visual, memory,
                                                     memory_kv, visual_kv, return_kv=True)
            visual_entry = torch.cat([t for li in cross for t in kvs[li][1]], dim=-1) if cached else None
            state = state.evolve(
                visual=push(vbank, f_t, cfg.policy("visual"), cfg.memory_length, visual_entry),
                queries=tuple(push(bank, x, cfg.policy("query"), cfg.memory_length,
                                   torch.cat(kv[0], dim=-1) if cached else None)
                              for bank, x, kv in zip(banks, layer_inputs, kvs)),
                frames_seen=state.frames_seen + 1,
                last_hidden=hidden,
            )
        return state

    def _with_visual_cache(self, bank, cross: list[int], dtype):
        """``bank`` with the cross-attention keys and values of every layer in ``cross`` ([K V K V …] wide)."""
        if bank is None or bank.cache is not None:
            return bank
        slots = bank.slots.to(dtype)
        cache = []
        for li in cross:
            att = self.qformer.encoder.layer[li].crossattention.attention
            cache += [att.key(slots), att.value(slots)]
        return replace(bank, cache=torch.cat(cache, dim=-1))

    def _with_query_cache(self, layer, bank):
        """A query memory bank with its self-attention keys and values in ``layer`` ([K V] wide)."""
        if bank is None or bank.cache is not None:
            return bank
        att = layer.attention.attention
        slots = bank.slots.to(att.key.weight.dtype)
        return replace(bank, cache=torch.cat([att.key(slots), att.value(slots)], dim=-1))

    def readout(self, state: MemoryState) -> torch.Tensor:
        """The learned queries' outputs after the frames seen so far, ``[B, Nq, D]``
        (``[B, T·Nq, D]`` in the ``per_frame`` mode: frame 0's queries first)."""
        if state.frames_seen == 0:
            raise ValueError("readout before any frame was fed; call step() first")
        if self.config.memory == "per_frame":
            return self._per_frame_readout(state)
        if self.config.aggregation == "memory":
            return state.last_hidden[:, : self.num_query_tokens]
        f = self.frame_features(state.frames, 0)  # [B, T, P, C]
        if self.config.aggregation == "concat":
            visual = f.reshape(f.shape[0], -1, f.shape[-1])  # all frames' tokens: [B, T·P, C]
        else:  # avgpool
            visual = f.mean(dim=1)
        hidden, _ = self.qformer(self.query_tokens.expand(state.batch_size, -1, -1), state.instruction_ids,
                                 self._qformer_mask(state), visual)
        return hidden[:, : self.num_query_tokens]

    def _per_frame_readout(self, state: MemoryState) -> torch.Tensor:
        """The reference's no-memory path: each frame ``ln_vision(f_t)`` (no frame position embedding)
        through the Q-Former alone, with the instruction; the queries' outputs of all frames side by side."""
        frames = state.frames
        B, T = frames.shape[:2]
        visual = self.ln_vision(frames.to(device=self.device, dtype=self.ln_vision.weight.dtype))
        visual = visual.reshape(B * T, *visual.shape[2:])  # [B·T, P, C], video b's frames together
        ids = state.instruction_ids.repeat_interleave(T, dim=0)
        mask = self._qformer_mask(state).repeat_interleave(T, dim=0)
        hidden, _ = self.qformer(self.query_tokens.expand(B * T, -1, -1), ids, mask, visual)
        return hidden[:, : self.num_query_tokens].reshape(B, T * self.num_query_tokens, -1)

    def _qformer_mask(self, state: MemoryState) -> torch.Tensor:
        ones = torch.ones(state.batch_size, self.num_query_tokens, dtype=state.instruction_mask.dtype,
                          device=state.instruction_mask.device)
        return torch.cat([ones, state.instruction_mask], dim=1)

    def encode_video(self, features: torch.Tensor, prompts: list[str], first_frame: int = 0) -> torch.Tensor:
        """Whole videos -> the LLM's video tokens ``[B, Nq, H_llm]`` (only the last step is projected;
        ``[B, T·Nq, H_llm]`` in the ``per_frame`` mode).

        ``first_frame``: the frame position of ``features[:, 0]`` (0: the clip is the whole input;
        the tiny builder's image pretraining shows single frames at random positions).
        With ``no_grad_prefix`` and autograd on, steps 0..T-2 run under ``torch.no_grad``: they only
        build (detached) memory, so the gradients equal those of an all-autograd loop.
        """
        if features.dim() != 4 or features.shape[1] < 1:
            raise ValueError(f"features must be [B, T>=1, P, C], got shape {tuple(features.shape)}")
        if len(prompts) != features.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for a batch of {features.shape[0]} videos")
        state = self.init_state(prompts)
        if first_frame:
            state = state.evolve(frames_seen=int(first_frame))
        if self.config.no_grad_prefix and torch.is_grad_enabled() and features.shape[1] > 1:
            with torch.no_grad():
                state = self.step(state, features[:, :-1])
            state = self.step(state, features[:, -1:])
        else:
            state = self.step(state, features)
        return self.language_projection(self.readout(state))

    # -- LLM side ------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        return ids[-self.config.max_prompt_tokens:]  # left truncation, as LAVIS

    def _target_ids(self, target: str) -> list[int]:
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        return ids[: self.config.max_target_tokens - 1] + [self.tokenizer.eos_token_id]

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def forward(self, features: torch.Tensor, prompts: list[str], targets: list[str],
                first_frame: int = 0) -> MALMMOutput:
        """Training loss: the LLM reads [video tokens][prompt][target + eos]; loss on target tokens only."""
        if len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        video = self.encode_video(features, prompts, first_frame)
        B, Nq = video.shape[:2]
        rows = []
        for p, t in zip(prompts, targets):
            pi, ti = self._prompt_ids(p), self._target_ids(t)
            rows.append((pi + ti, [-100] * len(pi) + ti))
        width = max(len(ids) for ids, _ in rows)
        pad = self._pad_id()
        ids = torch.full((B, width), pad, dtype=torch.long)
        labels = torch.full((B, Nq + width), -100, dtype=torch.long)
        mask = torch.zeros(B, Nq + width, dtype=torch.long)
        mask[:, :Nq] = 1
        for b, (row_ids, row_labels) in enumerate(rows):  # right padding
            ids[b, : len(row_ids)] = torch.tensor(row_ids)
            labels[b, Nq: Nq + len(row_labels)] = torch.tensor(row_labels)
            mask[b, Nq: Nq + len(row_ids)] = 1
        embed = self.llm.get_input_embeddings()
        text = embed(ids.to(embed.weight.device))
        inputs = torch.cat([video.to(text.dtype), text], dim=1)
        labels = labels.to(inputs.device)
        if self.config.loss_reduction == "token":
            out = self.llm(inputs_embeds=inputs, attention_mask=mask.to(inputs.device), labels=labels)
            return MALMMOutput(loss=out.loss, logits=out.logits)
        logits = self.llm(inputs_embeds=inputs, attention_mask=mask.to(inputs.device)).logits
        target = labels[:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100,
                                    reduction="none")  # [B, L-1]
        valid = (target != -100).float()
        loss = ((per_token * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()
        return MALMMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, prompts: list[str], num_beams: int = 5, max_new_tokens: int = 30,
                 min_new_tokens: int = 1, repetition_penalty: float = 1.5, length_penalty: float = 1.0,
                 num_return_sequences: int = 1, return_num_tokens: bool = False, first_frame: int = 0):
        """Beam search (no sampling) for a batch of videos; the LLM reads [video tokens][prompt].

        Batched with left padding ([pad][video tokens][prompt]); padding is masked, so a batch
        gives the same beams as one video at a time.

        Returns:
            per sample, the ``num_return_sequences`` decoded strings (best first); with
            ``return_num_tokens`` also, per sample and beam, the number of generated tokens
            (eos and padding excluded).
        """
        from transformers import GenerationConfig  # heavy: imported on use

        video = self.encode_video(features, prompts, first_frame)
        B, Nq = video.shape[:2]
        embed = self.llm.get_input_embeddings()
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        width = Nq + max(len(p) for p in prompt_ids)
        pad = self._pad_id()
        pad_vec = embed(torch.tensor([pad], device=embed.weight.device))[0]
        rows, masks = [], []
        for b, ids in enumerate(prompt_ids):
            n_pad = width - Nq - len(ids)
            text = embed(torch.tensor(ids, dtype=torch.long, device=embed.weight.device))
            rows.append(torch.cat([pad_vec.expand(n_pad, -1), video[b].to(text.dtype), text], dim=0))
            masks.append(torch.tensor([0] * n_pad + [1] * (Nq + len(ids)), dtype=torch.long))
        inputs = torch.stack(rows)
        mask = torch.stack(masks).to(inputs.device)
        eos = self.tokenizer.eos_token_id
        gen = GenerationConfig(num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                               min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                               length_penalty=length_penalty, num_return_sequences=num_return_sequences,
                               eos_token_id=eos, pad_token_id=pad, bos_token_id=self.tokenizer.bos_token_id)
        with warnings.catch_warnings():  # as in LAVIS, the penalty applies to generated tokens only
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")
            out = self.llm.generate(inputs_embeds=inputs, attention_mask=mask, generation_config=gen)
        out = out.view(B, num_return_sequences, -1).cpu()
        texts = [[s.strip() for s in self.tokenizer.batch_decode(out[b], skip_special_tokens=True)]
                 for b in range(B)]
        if not return_num_tokens:
            return texts
        counts = [[_generated_length(seq, eos, pad) for seq in out[b]] for b in range(B)]
        return texts, counts


def _split_kv(cache: torch.Tensor, j: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The j-th (keys, values) pair of a bank's cache ``[B, M, N, (K V K V …)]``, each ``[B, M·N, width]``."""
    k = cache.narrow(-1, 2 * j * width, width)
    v = cache.narrow(-1, (2 * j + 1) * width, width)
    return k.flatten(1, 2), v.flatten(1, 2)


def _generated_length(seq: torch.Tensor, eos: int, pad: int) -> int:
    """Tokens generated before the first eos (padding after it excluded)."""
    n = 0
    for tok in seq.tolist():
        if tok == eos:
            break
        if tok != pad:
            n += 1
    return n
