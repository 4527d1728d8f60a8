"""MA-LMM's long-term memory: the memory banks, their update policies and memory bank compression.

Terms follow the paper (He et al., "MA-LMM: Memory-Augmented Large Multimodal Model for
Long-Term Video Understanding", CVPR 2024, section 3):

* a **memory bank** is a sequence of M slots ``[B, M, N, C]`` (N tokens per slot) with a size
  counter per slot and token ``[B, M, N]`` (how many original frames were averaged into it);
* the **visual memory bank** holds past frame features and is shared by every cross-attention
  layer of the Q-Former; a **query memory bank** per Q-Former layer holds that layer's past input
  hidden states;
* **memory bank compression (MBC)** keeps a bank at L slots by averaging the most similar pair of
  temporally adjacent slots (:func:`compress`).

Everything here is a pure function of tensors or an immutable dataclass; the only state of a
video being processed is a :class:`MemoryState` value that the caller holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

POLICIES = ("mbc", "fifo", "none")


def compress(bank: torch.Tensor, sizes: torch.Tensor,
             *riders: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Memory bank compression (MBC): merge the most similar adjacent pair of slots, per token.

    Independently for every batch element b and token position i:

    1. cosine similarity of temporally adjacent slots ``s_k[i]`` and ``s_{k+1}[i]``, k = 0..M-2;
    2. ``k* = argmax_k`` (the first one on ties);
    3. slot k* becomes the size-weighted mean ``(n_k s_k + n_{k+1} s_{k+1}) / (n_k + n_{k+1})``
       (the paper's Eq. 7 writes a plain mean; the reference code weights by size, and so do we),
       slot k*+1 is dropped, the order of the other slots is kept, and the sizes add.

    Args:
        bank: ``[B, M, N, C]`` slots, M >= 2.
        sizes: ``[B, M, N]`` number of frames merged into each slot (ones for fresh frames).
        riders: more ``[B, M, N, *]`` tensors that follow the slots: merged with the same pair and
            weights (the bank's cached keys and values, see :class:`Bank`).

    Returns:
        ``(bank, sizes, *riders)`` with M-1 slots, same dtypes. Vectorised: no loop over B or N.
    """
    if bank.dim() != 4 or sizes.shape != bank.shape[:3]:
        raise ValueError(f"compress expects bank [B, M, N, C] and sizes [B, M, N], got {tuple(bank.shape)} "
                         f"and {tuple(sizes.shape)}")
    B, M, N, C = bank.shape
    if M < 2:
        raise ValueError(f"compress needs at least 2 slots, got {M}")
    for r in riders:
        if r.shape[:3] != bank.shape[:3]:
            raise ValueError(f"a rider of compress must be [B, M, N, *] like the bank {tuple(bank.shape[:3])}, "
                             f"got {tuple(r.shape)}")
    work = bank.float()
    similarity = F.cosine_similarity(work[:, :-1], work[:, 1:], dim=-1)  # [B, M-1, N]
    k_star = similarity.argmax(dim=1, keepdim=True)  # [B, 1, N]; argmax returns the first maximum

    # Output slot j takes input slot j (j < k*), the merged pair (j == k*) or input slot j+1 (j > k*).
    j = torch.arange(M - 1, device=bank.device).view(1, M - 1, 1)
    source = j + (j > k_star).long()  # [B, M-1, N]
    is_merged = j == k_star  # [B, M-1, N]
    n_k = sizes.gather(1, k_star).float()  # [B, 1, N]
    n_next = sizes.gather(1, k_star + 1).float()

    def merge(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        width = x32.shape[-1]
        kept = x32.gather(1, source.unsqueeze(-1).expand(B, M - 1, N, width))
        s_k = x32.gather(1, k_star.unsqueeze(-1).expand(B, 1, N, width))
        s_next = x32.gather(1, (k_star + 1).unsqueeze(-1).expand(B, 1, N, width))
        merged = (n_k.unsqueeze(-1) * s_k + n_next.unsqueeze(-1) * s_next) / (n_k + n_next).unsqueeze(-1)
        return torch.where(is_merged.unsqueeze(-1), merged, kept).to(x.dtype)

    out_sizes = torch.where(is_merged, (n_k + n_next).to(sizes.dtype), sizes.gather(1, source))
    return (merge(bank), out_sizes, *(merge(r) for r in riders))


@dataclass(frozen=True)
class Bank:
    """One memory bank: ``slots`` [B, M, N, C] and their ``sizes`` [B, M, N] (frames per slot).

    ``cache``: optionally, projections of the slots that the attention layers reading the bank
    would otherwise recompute at every step, side by side in one ``[B, M, N, W]`` tensor (the keys
    and values of each layer, see ``MALMM.step``). They follow the slots through :func:`push`:
    appended with each entry, dropped with a FIFO slot, and merged with the same weights by MBC —
    exact, because a projection ``W x + b`` of a weighted mean (weights summing to one) is the
    weighted mean of the projections. A bank whose entry came without a cache has none.
    """

    slots: torch.Tensor
    sizes: torch.Tensor
    cache: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.slots.shape[1]

    def flat(self) -> torch.Tensor:
        """The slots as one token sequence ``[B, M*N, C]`` (what an attention layer reads)."""
        B, M, N, C = self.slots.shape
        return self.slots.reshape(B, M * N, C)


def push(bank: Bank | None, entry: torch.Tensor, policy: str, length: int,
         cache: torch.Tensor | None = None) -> Bank | None:
    """Append ``entry`` [B, N, C] (detached) as the newest slot, then enforce the bank length L.

    Policies (``mbc`` is the paper's method; ``fifo`` and ``none`` its ablations):
        ``mbc``  – when the bank holds more than L slots, :func:`compress` it by exactly one slot;
        ``fifo`` – when it holds more than L slots, drop the oldest slot;
        ``none`` – keep no memory at all (returns None).

    ``cache``: the entry's projections ``[B, N, W]`` (see :class:`Bank`); kept only when the bank's
    older slots have theirs too (or the bank is new), else the bank keeps no cache.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown memory policy {policy!r}; expected one of {POLICIES}")
    if policy == "none":
        return None
    entry = entry.detach()
    new_cache = None if cache is None else cache.detach().unsqueeze(1)
    ones = torch.ones(entry.shape[:2], dtype=torch.float32, device=entry.device)
    if bank is None:
        bank = Bank(entry.unsqueeze(1), ones.unsqueeze(1), new_cache)
    else:
        if bank.cache is not None and new_cache is not None:
            if bank.cache.shape[-1] != new_cache.shape[-1]:
                raise ValueError(f"the entry's cache is {new_cache.shape[-1]} wide, the bank's {bank.cache.shape[-1]}")
            new_cache = torch.cat([bank.cache, new_cache], dim=1)
        else:
            new_cache = None
        bank = Bank(torch.cat([bank.slots, entry.unsqueeze(1)], dim=1),
                    torch.cat([bank.sizes, ones.unsqueeze(1)], dim=1), new_cache)
    if bank.length > length:
        if policy == "mbc":
            bank = Bank(*compress(bank.slots, bank.sizes, *(() if bank.cache is None else (bank.cache,))))
        else:  # fifo
            bank = Bank(bank.slots[:, 1:], bank.sizes[:, 1:], None if bank.cache is None else bank.cache[:, 1:])
    return bank


@dataclass(frozen=True)
class MemoryState:
    """Everything MA-LMM remembers about the videos of one batch, between two steps.

    A value, not a module attribute: :meth:`MALMM.step` returns a new state and never mutates the
    one it was given, so a caller can feed frames in chunks, read out (ask a question) at any time,
    and nothing survives from one video or batch to the next.

    Attributes:
        instruction_ids, instruction_mask: the Q-Former instruction (the prompt, tokenized by the
            Q-Former tokenizer) fed alongside the learned queries at every step, ``[B, S]``.
        visual: the visual memory bank ``[B, M, P, C]`` of past frame features (after the vision
            layer norm and the frame position embedding), shared by all cross-attention layers.
        queries: one query memory bank per Q-Former layer, ``[B, M, Nq + S, D]``: that layer's input
            hidden states (learned queries and instruction tokens) of past steps.
        frames_seen: number of frames processed so far (the next frame's position index).
        last_hidden: Q-Former output ``[B, Nq + S, D]`` of the most recent step (None before any).
        frames: raw frame features kept by the memory-less baselines of the paper's Table 8
            (``concat`` / ``avgpool`` aggregation) and by the ``per_frame`` mode (every frame through
            the Q-Former alone), ``[B, T, P, C]``; None otherwise.
    """

    instruction_ids: torch.Tensor
    instruction_mask: torch.Tensor
    visual: Bank | None = None
    queries: tuple[Bank | None, ...] = field(default_factory=tuple)
    frames_seen: int = 0
    last_hidden: torch.Tensor | None = None
    frames: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.instruction_ids.shape[0]

    def evolve(self, **changes) -> "MemoryState":
        """A copy with some fields replaced (states are immutable)."""
        return replace(self, **changes)
