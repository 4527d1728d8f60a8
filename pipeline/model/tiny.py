"""The embedded default model ("tiny"): a real InstructBLIP directory, small enough for a CPU.

Same classes and files as ``Salesforce/instructblip-vicuna-7b`` (``InstructBlipForConditionalGeneration``
+ ``InstructBlipProcessor`` saved with ``save_pretrained``), with tiny configs:

* vision: ``InstructBlipVisionModel`` with ``initializer_range=0.02`` (InstructBLIP's default
  ``1e-10`` makes a random ViT emit ~1e-9 features that the next LayerNorm flattens);
* Q-Former: cross-attention every 2nd layer, width = vision width, ``num_query_tokens`` learned
  queries (32 as InstructBLIP by default; the embedded default has one per frame the synthetic
  protocol samples, 12, see :mod:`pipeline.defaults`);
* LLM: ``LlamaForCausalLM``, **pretrained** as a language model on the given corpus (texts of the
  synthetic benchmark: the object of every frame, one word each, where the video tokens go, then
  a question and its answer) so that, like Vicuna, it reads and copies from its context; a random
  LLM could not be steered through soft prompts;
* tokenizers: a word-level tokenizer built with the ``tokenizers`` library over the corpus
  vocabulary (LLM: ``<pad> <s> </s> <unk>``, adds ``<s>``), and a BERT-style one for the Q-Former;
* Q-Former, queries, projection and vision post-layer-norm: optionally **pretrained on images**
  after the LLM (:func:`pretrain_qformer`), as InstructBLIP is before MA-LMM starts from it. A
  random Q-Former needs about a thousand steps before anything it writes is readable by the LLM
  (measured on the synthetic benchmark's frames: 66 % held-out answers after 400 steps, 100 %
  after 1200), which a short MA-LMM run cannot afford on top of learning to use its memory.
  Frames are shown at random rows of the sinusoidal frame position table the synthetic protocol
  starts from, so the pretrained Q-Former reads a frame whatever its position.

Built once into a temporary directory and renamed into place, then loaded through exactly the
same code path as a real checkpoint (:func:`pipeline.model.checkpoint.load_malmm`).
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline.model.checkpoint import _quiet_transformers, hf_to_malmm_keys
from pipeline.model.modeling_malmm import MALMM, MALMMConfig
from pipeline.vision import pixel_values, pre_layernorm_features

from pipeline import storage
from pipeline.optim import adamw, warmup_cosine

LM_BETAS = (0.9, 0.98)  # the tiny LLM's pretraining (a shorter second-moment memory than train's)
LLM_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
#: in a corpus text, ``context <s> text``: the context stands where MA-LMM puts its video tokens
#: (before the prompt's ``<s>``, see :func:`encode_lm_text`)
CONTEXT_MARK = "<s>"
#: the token that fills a context up to the video tokens' length
CONTEXT_FILLER = "<image>"
QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
# Words of the benchmarks' prompt templates (`pipeline.benchmarks`), so that prompts never tokenize to <unk>.
PROMPT_WORDS = ("question : short answer what is the of movie type breakfast shown in video activity does "
                "describe relationship way_speaking scene director genre writer year verb noun action next "
                "? . , ' \"").split()


def sample_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """A small corpus of the synthetic benchmark's kind: events, then a question and its answer.

    E.g. ``"red circle moves left . blue star moves up . what colour was the first object ? red"``.
    For tests and quick experiments; the demo pretrains on ``pipeline.synth.lm_corpus``.
    """
    rng = random.Random(seed)
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    moves = ["left", "right", "up", "down"]
    ordinals = ["first", "second", "third"]
    out = []
    for _ in range(n):
        events = [(rng.choice(colours), rng.choice(shapes), rng.choice(moves)) for _ in range(rng.randint(2, 4))]
        i = rng.randrange(len(events))
        which = "last" if i == len(events) - 1 else ordinals[i]
        ask = rng.randrange(3)
        question = [f"what colour was the {which} object ?", f"what shape was the {which} object ?",
                    f"where did the {which} object move ?"][ask]
        story = " . ".join(f"{c} {s} moves {m}" for c, s, m in events)
        out.append(f"{story} . {question} {events[i][ask]}")
    return out


def _pre_tokenize(text: str) -> list[str]:
    from tokenizers import normalizers, pre_tokenizers  # heavy: imported on use
    norm = normalizers.Lowercase().normalize_str(text.replace(CONTEXT_MARK, " "))
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(norm)]


def build_vocabulary(corpus: list[str], extra_words=()) -> list[str]:
    """Corpus words (lower-cased, split on whitespace and punctuation), most frequent first."""
    counts = Counter()
    for text in corpus:
        counts.update(_pre_tokenize(text))
    counts.update({w: 0 for w in extra_words for w in _pre_tokenize(w)})
    return sorted(counts, key=lambda w: (-counts[w], w))


def _word_tokenizer(words: list[str], specials: list[str], template: tuple[str, ...], **special_roles):
    """A ``PreTrainedTokenizerFast`` over a word-level ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # heavy: on use
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    unk = special_roles["unk_token"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(template), special_tokens=[(t, vocab[t]) for t in template if t != "$A"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_roles)


def build_tokenizers(corpus: list[str], extra_words=()):
    """(LLM tokenizer, Q-Former tokenizer) over the corpus vocabulary."""
    words = build_vocabulary(corpus, list(PROMPT_WORDS) + list(extra_words))
    llm_tok = _word_tokenizer(words, LLM_SPECIALS, ("<s>", "$A"), pad_token="<pad>", bos_token="<s>",
                              eos_token="</s>", unk_token="<unk>")
    qformer_tok = _word_tokenizer(words, QFORMER_SPECIALS, ("[CLS]", "$A", "[SEP]"), pad_token="[PAD]",
                                  unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  bos_token="[DEC]")
    return llm_tok, qformer_tok


def tiny_config(llm_vocab: int, qformer_vocab: int, *, image_size=64, patch_size=16, vision_hidden=64,
                vision_layers=2, qformer_hidden=64, qformer_layers=4, num_query_tokens=32, llm_hidden=128,
                llm_layers=2, llm_heads=4, image_token_index=4):
    from transformers import (InstructBlipConfig, InstructBlipQFormerConfig,  # heavy: imported on use
                              InstructBlipVisionConfig, LlamaConfig)

    vision = InstructBlipVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                                      num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                      patch_size=patch_size, initializer_range=0.02)
    qformer = InstructBlipQFormerConfig(vocab_size=qformer_vocab, hidden_size=qformer_hidden,
                                        num_hidden_layers=qformer_layers, num_attention_heads=4,
                                        intermediate_size=4 * qformer_hidden, cross_attention_frequency=2,
                                        encoder_hidden_size=vision_hidden, max_position_embeddings=256,
                                        pad_token_id=0,
                                        # dropout costs a large share of a CPU training step (a Bernoulli
                                        # draw per activation: half of it for attention probabilities,
                                        # 13 % for hidden states, measured); the demo trains too briefly to
                                        # overfit
                                        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    text = LlamaConfig(vocab_size=llm_vocab, hidden_size=llm_hidden, intermediate_size=4 * llm_hidden,
                       num_hidden_layers=llm_layers, num_attention_heads=llm_heads, num_key_value_heads=llm_heads,
                       max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                              text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                              image_token_index=image_token_index)


def encode_lm_text(tokenizer, text: str, context_tokens: int, max_len: int = 256) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one corpus text for LM pretraining.

    A plain text is ``<s> text </s>``. A text ``context <s> text`` is laid out as MA-LMM lays out
    its LLM input, ``[video tokens][<s> prompt][answer </s>]``: the context's tokens, filled up with
    ``<image>`` to ``context_tokens`` positions (the number of video tokens), then ``<s> text </s>``.
    So the frozen LLM learns to read the facts it needs from the positions where the Q-Former's
    tokens will be, before the prompt's ``<s>``, as a trained LLM would with a real projection.
    No loss on the context: like MA-LMM's video tokens it is given, not predicted (a loss on it
    spends most of the model's pretraining on a random sequence; without it the next-event
    answers went from 87 % to 100 % with the true context, measured).
    """
    context, mark, rest = text.partition(CONTEXT_MARK)
    if not mark:
        context, rest = "", text
    ids = tokenizer(rest)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id]
    labels = list(ids)
    if mark:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"][-context_tokens:]
        fill = context_tokens - len(ctx)
        ids = ctx + [tokenizer.convert_tokens_to_ids(CONTEXT_FILLER)] * fill + ids
        labels = [-100] * context_tokens + labels
    return ids, labels


def _lm_batches(tokenizer, corpus: list[str], batch_size: int, rng: random.Random, context_tokens: int):
    """Endless batches of (input_ids, mask, labels) of :func:`encode_lm_text`, right padded."""
    encoded = [encode_lm_text(tokenizer, text, context_tokens) for text in corpus]
    while True:
        rows = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        yield _pad(rows, tokenizer.pad_token_id)


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return ids, mask, labels


@torch.no_grad()
def lm_loss(llm, tokenizer, texts: list[str], batch_size: int = 64, context_tokens: int = 32) -> float:
    """Mean next-token loss (nats per token) of the LLM on ``texts`` (laid out by :func:`encode_lm_text`)."""
    was_training = llm.training
    llm.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        rows = [encode_lm_text(tokenizer, t, context_tokens) for t in texts[i:i + batch_size]]
        ids, mask, labels = _pad(rows, tokenizer.pad_token_id)
        n = int((labels[:, 1:] != -100).sum())
        total += float(llm(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        count += n
    llm.train(was_training)
    return total / max(count, 1)


def _warmup_cosine(optimizer, steps: int):
    """The shared warm-up/cosine schedule (`pipeline.optim`) with a warm-up of 5 % of ``steps``."""
    return warmup_cosine(optimizer, max(1, steps // 20), steps, clamp=False)


def pretrain_language_model(llm, tokenizer, corpus: list[str], *, steps: int, batch_size: int = 32,
                            lr: float = 2e-3, seed: int = 0, log_every: int = 0,
                            context_tokens: int = 32) -> list[float]:
    """Plain next-token training of the LLM on ``corpus`` (AdamW, warm-up then cosine); returns losses."""
    rng = random.Random(seed)
    opt = adamw(llm.parameters(), lr=lr, betas=LM_BETAS, weight_decay=0.01)
    sched = _warmup_cosine(opt, steps)
    batches = _lm_batches(tokenizer, corpus, batch_size, rng, context_tokens)
    llm.train()
    losses = []
    for step in range(steps):
        ids, mask, labels = next(batches)
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  LM pretraining step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}",
                  flush=True)
    llm.eval()
    return losses


def pretrain_qformer(model, llm_tok, qformer_tok, frames, pairs: list[tuple[str, str]], *, steps: int,
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 0, held_out: int = 256,
                     frame_positions: int = 0, log_every: int = 0) -> dict:
    """InstructBLIP-style image pretraining of ``model``'s Q-Former, query tokens, projection and
    vision post-layer-norm (ViT body and LLM frozen), in place.

    ``frames`` ``[n, H, W, 3]`` uint8 with ``pairs`` of (prompt, answer): the Q-Former reads the
    instruction and the frame's ViT tokens, its query outputs become the LLM's first tokens, and
    the loss is on the answer — MA-LMM's objective with one frame and no memory, which is exactly
    InstructBLIP's (and the path :class:`MALMM` runs, so the weights are saved back under HF names).
    The last ``held_out`` frames are not trained on; returns their greedy answer accuracy.

    ``frame_positions`` > 0: each batch shows its frames at a random position t < frame_positions
    of a (frozen) sinusoidal frame position table (:func:`pipeline.model.modeling_malmm.sinusoidal_table`),
    i.e. as one frame of a video, so that the Q-Former learns to read a frame whatever position
    embedding it carries. MA-LMM's synthetic protocol starts from that table, whose rows of
    amplitude 3 outweigh a normalised frame token (measured, in-process MA-LMM runs of batch 8 on
    the demo's features: first colour 94 % after 300 steps with, 84 % without; qa 51 % against
    47 % after 900; next event 22 % either way).
    """
    with torch.no_grad():  # the frozen ViT runs once over all frames
        x = pixel_values(torch.from_numpy(np.ascontiguousarray(frames)))
        feats = torch.cat([pre_layernorm_features(model.vision_model, x[i:i + 256]) for i in range(0, len(x), 256)])
    positions = max(1, int(frame_positions))
    mm = MALMM(MALMMConfig(memory="none", max_frames=positions, memory_length=1,
                           frame_position_init="sinusoidal" if frame_positions else "zeros"),
               model.config, model.language_model, llm_tok, qformer_tok)
    mm.frame_position_embedding.requires_grad_(False)  # not part of InstructBLIP: the table stays as built
    mm.load_state_dict({k: v for k, v in hf_to_malmm_keys(model.state_dict()).items()
                        if not k.startswith("llm.")}, strict=False)
    n_train = len(feats) - held_out
    gen = torch.Generator().manual_seed(seed)
    params = mm.trainable_parameters()
    opt = adamw(params, lr=lr, weight_decay=0.05)
    sched = _warmup_cosine(opt, steps)
    mm.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen).tolist()
        t = int(torch.randint(0, positions, (1,), generator=gen))
        loss = mm(features=feats[idx][:, None], prompts=[pairs[i][0] for i in idx],
                  targets=[pairs[i][1] for i in idx], first_frame=t).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  Q-Former pretraining step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}",
                  flush=True)
    mm.eval()
    hits = []
    with torch.no_grad():
        for i in range(n_train, len(feats), 64):
            j = list(range(i, min(len(feats), i + 64)))
            out = mm.generate(feats[j][:, None], [pairs[k][0] for k in j], num_beams=1, max_new_tokens=4,
                              repetition_penalty=1.0, first_frame=(i // 64) % positions)
            hits += [o[0] == pairs[k][1] for o, k in zip(out, j)]
        # back into the InstructBLIP model, under its own names
        model.qformer.load_state_dict(mm.qformer.state_dict(), strict=False)
        model.query_tokens.copy_(mm.query_tokens)
        model.language_projection.load_state_dict(mm.language_projection.state_dict())
        model.vision_model.post_layernorm.load_state_dict(mm.ln_vision.state_dict())
    return {"final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
            "held_out_accuracy": sum(hits) / max(1, len(hits)), "held_out": len(hits)}


def build_tiny_instructblip(out_dir: str | Path, corpus: list[str], *, seed: int = 0, image_size: int = 64,
                            patch_size: int = 16, vision_hidden: int = 64, vision_layers: int = 2,
                            qformer_hidden: int = 64, qformer_layers: int = 4, num_query_tokens: int = 32,
                            llm_hidden: int = 128, llm_layers: int = 2, llm_heads: int = 4,
                            pretrain_steps: int = 2000, batch_size: int = 16, lr: float = 2e-3,
                            image_corpus=None, qformer_steps: int = 1200, qformer_frame_positions: int = 0,
                            extra_words=(), verbose: bool = False) -> Path:
    """Create the tiny InstructBLIP directory at ``out_dir`` (atomically) and return its path.

    Args:
        corpus: texts the LLM is pretrained on (and whose words form the vocabulary).
        llm_layers: 2 by default: enough to read an answer out of the context by content (the
            synthetic corpus is laid out so that no task needs more, see ``pipeline.synth.lm_corpus``)
            and to keep pretraining within a minute or so on 2 CPU cores.
        pretrain_steps: LLM pretraining steps (batch ``batch_size``); the default (2000 x 16 texts)
            takes about 60 s on 2 idle CPU cores and reaches ~0.09 nats per prompt and answer token
            on the synthetic corpus, answering all four tasks from the true context (100 % of
            400 held-out texts, measured). Small values are fine for tests.
        image_corpus: ``(frames [n, H, W, 3] uint8, [(prompt, answer)])`` to pretrain the Q-Former on
            images after the LLM (:func:`pretrain_qformer`, ``qformer_steps`` steps), as InstructBLIP
            is pretrained before MA-LMM starts from it; None leaves the Q-Former random.
        qformer_frame_positions: > 0 shows each image batch at a random row of a sinusoidal frame
            position table of that many rows (see :func:`pretrain_qformer`).
        extra_words: more words for the vocabularies (beyond the corpus and the prompt templates).

    Writes ``InstructBlipForConditionalGeneration`` weights + config, the processor (LLM tokenizer
    in the root, Q-Former tokenizer in ``qformer_tokenizer/``, image processor) and
    ``tiny_info.json`` (seed, steps, LM loss before / after pretraining, time).
    """
    import transformers  # heavy: the transformers model classes, imported on use
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    out_dir = Path(out_dir)
    if storage.exists(out_dir) and storage.listdir(out_dir, "*"):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    corpus = [t for t in corpus if t.strip()]
    if not corpus:
        raise ValueError("the tiny model needs a non-empty corpus to pretrain its LLM on")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    llm_tok, qformer_tok = build_tokenizers(corpus, extra_words)
    config = tiny_config(len(llm_tok), len(qformer_tok), image_size=image_size, patch_size=patch_size,
                         vision_hidden=vision_hidden, vision_layers=vision_layers, qformer_hidden=qformer_hidden,
                         qformer_layers=qformer_layers, num_query_tokens=num_query_tokens, llm_hidden=llm_hidden,
                         llm_layers=llm_layers, llm_heads=llm_heads,
                         image_token_index=llm_tok.convert_tokens_to_ids("<image>"))
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF zero-initialises the queries; identical queries would stay identical
        model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)

    rng = random.Random(seed)
    held_out = rng.sample(corpus, min(256, len(corpus)))
    loss_before = lm_loss(model.language_model, llm_tok, held_out, context_tokens=num_query_tokens)
    losses = pretrain_language_model(model.language_model, llm_tok, corpus, steps=pretrain_steps,
                                     batch_size=batch_size, lr=lr, seed=seed,
                                     log_every=max(1, pretrain_steps // 5) if verbose else 0,
                                     context_tokens=num_query_tokens)
    loss_after = lm_loss(model.language_model, llm_tok, held_out, context_tokens=num_query_tokens)
    model.language_model.requires_grad_(False)
    qformer_info = None
    if image_corpus is not None:
        frames, pairs = image_corpus
        qformer_info = pretrain_qformer(model, llm_tok, qformer_tok, frames, pairs, steps=qformer_steps, seed=seed,
                                        frame_positions=qformer_frame_positions,
                                        log_every=max(1, qformer_steps // 4) if verbose else 0)

    storage.makedirs(out_dir.parent)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    storage.remove_tree(tmp)
    # the PIL image processor (saved as a BlipImageProcessor) needs no torchvision
    image_processor_cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    image_processor = image_processor_cls(size={"height": image_size, "width": image_size},
                                          image_mean=[0.48145466, 0.4578275, 0.40821073],
                                          image_std=[0.26862954, 0.26130258, 0.27577711])
    with _quiet_transformers():
        model.save_pretrained(tmp)
        InstructBlipProcessor(image_processor=image_processor, tokenizer=llm_tok, qformer_tokenizer=qformer_tok,
                              num_query_tokens=num_query_tokens).save_pretrained(tmp)
    info = {"seed": seed, "pretrain_steps": pretrain_steps, "batch_size": batch_size, "lr": lr,
            "corpus_size": len(corpus), "llm_vocab": len(llm_tok), "qformer_vocab": len(qformer_tok),
            "initial_lm_loss": loss_before, "final_lm_loss": loss_after,
            "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
            "qformer_pretraining": ({"steps": qformer_steps, "images": len(image_corpus[0]),
                                     "frame_positions": qformer_frame_positions, **qformer_info}
                                    if qformer_info else None),
            "build_seconds": round(time.perf_counter() - t0, 2)}
    storage.write_json(tmp / "tiny_info.json", info, raw=True, mode=storage.UMASK, indent=1)
    if storage.exists(out_dir):
        storage.remove_tree(out_dir)  # empty (checked above)
    storage.move(tmp, out_dir)  # the whole folder at once: complete or absent
    return out_dir
