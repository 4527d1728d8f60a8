"""The memory Q-Former and the MA-LMM wrapper (`pipeline/model/modeling_malmm.py`; the README's
*Architecture* section): equivalences and streaming properties."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.model.checkpoint import load_malmm
from pipeline.model.modeling_malmm import MALMMConfig
from pipeline.model.tiny import build_tiny_instructblip, sample_corpus

PROMPTS = ["what colour was the first object ?", "where did the last object move ?",
           "what shape was the second object ? answer in one word"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_instructblip(tmp_path_factory.mktemp("tiny") / "model", sample_corpus(400), pretrain_steps=20)


def make(tiny_dir, **kw) -> torch.nn.Module:
    model = load_malmm(tiny_dir, MALMMConfig(**{"max_frames": 32, **kw}))
    with torch.no_grad():  # non-trivial values for the parts that start at zero / one
        g = torch.Generator().manual_seed(0)
        model.frame_position_embedding.normal_(0.0, 0.3, generator=g)
        model.ln_vision.weight.normal_(1.0, 0.2, generator=g)
    return model.eval()


def features(B=3, T=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 17, 64, generator=g).to(dtype)  # tiny ViT: 16 patches + CLS, width 64


# ----------------------------------------------------------------------------- equivalence with HF

@pytest.mark.parametrize("memory", ["none", "mbc"])
def test_single_frame_equals_hf_instructblip_qformer(tiny_dir, memory):
    from transformers import InstructBlipForConditionalGeneration

    ref = InstructBlipForConditionalGeneration.from_pretrained(tiny_dir).eval()
    model = load_malmm(tiny_dir, MALMMConfig(memory=memory)).eval()  # fresh: PE is zero, ln_vision as HF
    x = features(T=1)
    with torch.no_grad():
        image_embeds = ref.vision_model.post_layernorm(x[:, 0])
        enc = model.qformer_tokenizer(PROMPTS, padding="longest", return_tensors="pt")
        mask = torch.cat([torch.ones(3, 32, dtype=torch.long), enc.attention_mask], dim=1)
        expected = ref.qformer(input_ids=enc.input_ids, attention_mask=mask,
                               query_embeds=ref.query_tokens.expand(3, -1, -1),
                               encoder_hidden_states=image_embeds,
                               encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long)
                               ).last_hidden_state
        state = model.step(model.init_state(PROMPTS), x)
        ours = state.last_hidden
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
        # and the LLM inputs equal HF's language_projection of the query outputs
        proj = ref.language_projection(expected[:, :32])
        torch.testing.assert_close(model.language_projection(model.readout(state)), proj, atol=1e-5, rtol=0)


def test_real_size_qformer_equals_hf():
    """InstructBLIP's real Q-Former shape (BERT-base, 12 layers, 1408-wide ViT-g features, 257 tokens)."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    from pipeline.model.modeling_malmm import MemoryQFormer

    torch.manual_seed(0)
    cfg = InstructBlipQFormerConfig(vocab_size=30523)
    hf = InstructBlipQFormerModel(cfg).eval()
    ours = MemoryQFormer(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.tensor([[101, 2054, 2003, 1996, 3185, 102, 0], [101, 2054, 2828, 102, 0, 0, 0]])
    mask = torch.cat([torch.ones(2, 32, dtype=torch.long), (ids != 0).long()], dim=1)
    queries, image = torch.randn(2, 32, 768) * 0.5, torch.randn(2, 257, 1408)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=image,
                      encoder_attention_mask=torch.ones(2, 257, dtype=torch.long)).last_hidden_state
        got, layer_inputs = ours(queries, ids, mask, image)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert len(layer_inputs) == 12


def test_parameter_names_match_hf_qformer(tiny_dir):
    from transformers import InstructBlipQFormerModel, InstructBlipConfig

    hf = InstructBlipQFormerModel(InstructBlipConfig.from_pretrained(tiny_dir).qformer_config)
    model = make(tiny_dir)
    assert set(hf.state_dict()) == set(model.qformer.state_dict())
    model.qformer.load_state_dict(hf.state_dict(), strict=True)


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("kw", [dict(memory="mbc", memory_length=3), dict(memory="fifo", memory_length=2),
                                dict(memory="none"), dict(aggregation="concat"), dict(aggregation="avgpool"),
                                dict(memory="mbc", memory_length=2, visual_memory=False), dict(memory="per_frame")])
def test_chunked_equals_whole(tiny_dir, kw):
    model = make(tiny_dir, **kw)
    x = features(T=7)
    with torch.no_grad():
        whole = model.step(model.init_state(PROMPTS), x)
        for chunks in ([3, 3, 1], [1] * 7, [2, 0, 5]):
            state, t = model.init_state(PROMPTS), 0
            for n in chunks:
                state = model.step(state, x[:, t:t + n])
                t += n
            assert state.frames_seen == 7
            torch.testing.assert_close(model.readout(state), model.readout(whole), atol=1e-6, rtol=0)
            if whole.visual is not None:
                torch.testing.assert_close(state.visual.slots, whole.visual.slots, atol=1e-6, rtol=0)
                torch.testing.assert_close(state.visual.sizes, whole.visual.sizes)


def test_step_returns_new_state_and_online_readout(tiny_dir):
    model = make(tiny_dir, memory="mbc", memory_length=3)
    x = features(T=5)
    with torch.no_grad():
        s2 = model.step(model.init_state(PROMPTS), x[:, :2])
        early = model.readout(s2).clone()
        s5 = model.step(s2, x[:, 2:])
        torch.testing.assert_close(model.readout(s2), early, atol=0, rtol=0)  # s2 untouched
        assert s2.frames_seen == 2 and s5.frames_seen == 5
        assert s5.visual.length == 3 and all(b.length == 3 for b in s5.queries)
        assert torch.equal(s5.visual.sizes.sum(1), torch.full((3, 17), 5.0))
    with pytest.raises(ValueError, match="readout before any frame"):
        model.readout(model.init_state(PROMPTS))


def test_no_state_leaks_between_calls_or_batch_sizes(tiny_dir):
    model = make(tiny_dir, memory="mbc", memory_length=3)
    params = copy.deepcopy(model.state_dict())
    x, other = features(T=6), features(T=9, seed=5)
    with torch.no_grad():
        first = model.encode_video(x, PROMPTS)
        model.encode_video(other, PROMPTS)  # another batch in between
        model.encode_video(other[:1], PROMPTS[:1])
        again = model.encode_video(x, PROMPTS)
        singles = torch.cat([model.encode_video(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
        pair = model.encode_video(x[1:], PROMPTS[1:])
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(singles, first, atol=1e-5, rtol=0)
    torch.testing.assert_close(pair, first[1:], atol=1e-5, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    assert not any(isinstance(v, torch.Tensor) and k not in dict(model.named_parameters())
                   and k not in dict(model.named_buffers()) for k, v in vars(model).items())


def test_memory_carries_the_past_only_when_enabled(tiny_dir):
    x = features(T=6)
    changed = x.clone()
    changed[:, 0] = features(T=1, seed=9)[:, 0]  # only the first frame differs
    for kw, should_differ in ((dict(memory="mbc", memory_length=2), True),
                              (dict(memory="fifo", memory_length=5), True),
                              (dict(memory="fifo", memory_length=2), False),  # frame 0 dropped by then
                              (dict(memory="none"), False),
                              (dict(memory="mbc", visual_memory=False, query_memory=False), False),
                              (dict(memory="mbc", visual_memory=False), True),
                              (dict(memory="mbc", query_memory=False), True)):
        model = make(tiny_dir, **kw)
        with torch.no_grad():
            a, b = model.encode_video(x, PROMPTS), model.encode_video(changed, PROMPTS)
        assert (not torch.allclose(a, b, atol=1e-6)) == should_differ, kw


def test_memory_none_is_last_frame_only(tiny_dir):
    model = make(tiny_dir, memory="none")
    x = features(T=5)
    with torch.no_grad():
        state = model.step(model.init_state(PROMPTS), x)
        alone = model.step(model.init_state(PROMPTS), x[:, :4])
        alone = model.step(alone, x[:, 4:])
    assert state.visual is None and all(b is None for b in state.queries)
    torch.testing.assert_close(model.readout(state), model.readout(alone), atol=0, rtol=0)


def test_per_frame_is_the_reference_no_memory_path(tiny_dir):
    """memory='per_frame' (the reference's memory_bank_length = 0): every frame through the HF Q-Former on
    its own, with the instruction, after ln_vision and without the frame position embedding; the T x Nq
    query outputs of all frames, in frame order, are the LLM's video tokens."""
    from transformers import InstructBlipForConditionalGeneration

    ref = InstructBlipForConditionalGeneration.from_pretrained(tiny_dir).eval()
    model = make(tiny_dir, memory="per_frame", max_frames=4)  # a non-zero PE that must not be used
    assert bool(model.frame_position_embedding.abs().sum() > 0)
    B, T, nq = 3, 6, model.num_query_tokens  # 6 frames: more than max_frames (no position table is read)
    x = features(B=B, T=T)
    with torch.no_grad():
        enc = model.qformer_tokenizer(PROMPTS, padding="longest", return_tensors="pt")
        mask = torch.cat([torch.ones(B, nq, dtype=torch.long), enc.attention_mask], dim=1)
        per_frame = []
        for t in range(T):
            image = torch.nn.functional.layer_norm(x[:, t], (64,), model.ln_vision.weight, model.ln_vision.bias,
                                                   model.ln_vision.eps)
            out = ref.qformer(input_ids=enc.input_ids, attention_mask=mask,
                              query_embeds=ref.query_tokens.expand(B, -1, -1), encoder_hidden_states=image,
                              encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
            per_frame.append(out[:, :nq])
        expected = ref.language_projection(torch.cat(per_frame, dim=1))  # [B, T·Nq, H]: frame 0 first
        video = model.encode_video(x, PROMPTS)
    assert video.shape == (B, T * nq, ref.language_projection.out_features)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=0)
    # the LLM reads all T·Nq tokens: training and generation run on them
    out = model.forward(x, PROMPTS, ["red", "left", "circle"])
    assert torch.isfinite(out.loss) and out.logits.shape[1] > T * nq
    out.loss.backward()
    assert model.query_tokens.grad is not None and bool(model.query_tokens.grad.abs().sum() > 0)
    beams = model.generate(x, PROMPTS, num_beams=2, max_new_tokens=2, num_return_sequences=2)
    assert len(beams) == B and all(len(b) == 2 for b in beams)
    with pytest.raises(ValueError, match="per_frame"):
        MALMMConfig(memory="per_frame", aggregation="concat")


def test_train_accepts_the_per_frame_memory_mode():
    from pipeline.config import TrainConfig
    from stages.train import malmm_config

    hp = {"memory_length": 8, "num_frames": 12, "frame_position_init": "zeros", "loss_reduction": "token"}
    assert malmm_config(TrainConfig(memory="per_frame"), hp).memory == "per_frame"


def test_qformer_instruction_is_truncated_from_the_left(tiny_dir):
    """As the reference's Q-Former tokenizer (truncation_side='left'): a long instruction keeps its end."""
    model = make(tiny_dir, max_prompt_tokens=6)
    prompt = "what colour was the first object that moved left ?"
    full = model.qformer_tokenizer(prompt)["input_ids"]
    assert len(full) > 6
    ids = model.init_state([prompt]).instruction_ids[0].tolist()
    assert ids == [full[0]] + full[1:-1][-4:] + [full[-1]]  # [CLS] the last four words [SEP]


def test_first_frame_places_a_clip_in_the_position_table(tiny_dir):
    """encode_video(first_frame=t) reads the clip as frames t, t+1 …: a single frame at t equals the
    last frame of a memory-less pass over t+1 frames, and differs from the same frame at 0."""
    model = make(tiny_dir, memory="none")
    x = features(T=4)
    with torch.no_grad():
        at_3 = model.encode_video(x[:, 3:], PROMPTS, first_frame=3)
        whole = model.encode_video(x, PROMPTS)  # no memory: the readout sees frame 3 at position 3
        at_0 = model.encode_video(x[:, 3:], PROMPTS)
    torch.testing.assert_close(at_3, whole, atol=0, rtol=0)
    assert not torch.allclose(at_0, at_3, atol=1e-4)
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_video(x, PROMPTS, first_frame=30)


@pytest.mark.parametrize("kw", [dict(memory="mbc", memory_length=3), dict(memory="fifo", memory_length=3),
                                dict(memory="mbc", memory_length=2, visual_memory=False)])
def test_memory_kv_cache_equals_recomputing_the_banks(tiny_dir, kw):
    """Without autograd the banks keep each slot's keys and values; the video tokens agree with the
    reference recomputation to float rounding, also when fed in chunks, and the beams are the same."""
    model = make(tiny_dir, **kw)
    x = features(T=9)
    with torch.no_grad():
        model.config.memory_kv_cache = False
        ref = model.encode_video(x, PROMPTS)
        ref_beams = model.generate(x, PROMPTS, num_beams=2, max_new_tokens=4)
        model.config.memory_kv_cache = True
        got = model.encode_video(x, PROMPTS)
        state = model.step(model.step(model.init_state(PROMPTS), x[:, :4]), x[:, 4:])
        assert state.visual is None or state.visual.cache is not None
        assert all(bank.cache is not None for bank in state.queries)
        chunked = model.language_projection(model.readout(state))
        beams = model.generate(x, PROMPTS, num_beams=2, max_new_tokens=4)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-4)
    assert beams == ref_beams
    # a step with autograd stores no cache (its projections must stay differentiable)
    state = model.step(model.init_state(PROMPTS), x[:, :3])
    assert all(bank.cache is None for bank in state.queries)


def test_max_frames_is_a_clear_error(tiny_dir):
    model = make(tiny_dir, max_frames=4)
    with torch.no_grad():
        model.encode_video(features(T=4), PROMPTS)  # exactly max_frames is fine
        with pytest.raises(ValueError, match="max_frames=4"):
            model.encode_video(features(T=5), PROMPTS)
        state = model.step(model.init_state(PROMPTS), features(T=3))
        with pytest.raises(ValueError, match="max_frames"):
            model.step(state, features(T=2))


def test_any_float_dtype_is_cast(tiny_dir):
    model = make(tiny_dir)
    x = features(T=3)
    with torch.no_grad():
        a = model.encode_video(x, PROMPTS)
        b = model.encode_video(x.half(), PROMPTS)
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------- training

def _grads(model, x, prompts, targets, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks: same RNG stream in both runs
    loss = model(features=x, prompts=prompts, targets=targets).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_trainable_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [dict(memory="mbc", memory_length=2), dict(aggregation="concat")])
def test_no_grad_prefix_gives_identical_gradients(tiny_dir, kw):
    model = make(tiny_dir, **kw).train()
    x = features(T=5)
    targets = ["red", "up", "star"]
    model.config.no_grad_prefix, model.config.memory_kv_cache = True, False
    loss_a, grads_a = _grads(model, x, PROMPTS, targets, seed=7)
    model.config.memory_kv_cache = True  # the prefix keeps its banks' keys and values: float rounding only
    loss_c, grads_c = _grads(model, x, PROMPTS, targets, seed=7)
    model.config.no_grad_prefix = False
    loss_b, grads_b = _grads(model, x, PROMPTS, targets, seed=7)
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    torch.testing.assert_close(loss_c, loss_b, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() == grads_c.keys()
    expected = {n for n, _ in model.named_trainable_parameters()}
    assert set(grads_a) == expected  # every trainable tensor gets a gradient (DDP-safe)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-7, rtol=1e-5, msg=n)
        scale = float(grads_b[n].abs().max())
        torch.testing.assert_close(grads_c[n], grads_b[n], atol=1e-5 * scale + 1e-9, rtol=1e-4, msg=n)
    assert grads_a["frame_position_embedding"].abs().sum() > 0 and grads_a["ln_vision.weight"].abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())


def test_loss_is_on_target_tokens_only(tiny_dir):
    model = make(tiny_dir, memory="mbc", memory_length=3)
    x = features(T=3)
    targets = ["red", "up up down", "star"]
    with torch.no_grad():
        batch = model(features=x, prompts=PROMPTS, targets=targets).loss
        single = [model(features=x[i:i + 1], prompts=PROMPTS[i:i + 1], targets=targets[i:i + 1]).loss
                  for i in range(3)]
    counts = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in targets]  # + eos
    weighted = sum(l * n for l, n in zip(single, counts)) / sum(counts)
    torch.testing.assert_close(batch, weighted, atol=1e-5, rtol=0)
    # a longer prompt (a batch padded further) changes the context but never adds loss terms: the batch
    # loss is still the target-token-weighted mean of the samples' losses
    longer = [PROMPTS[0] + " where did the last object move ?", *PROMPTS[1:]]
    with torch.no_grad():
        batch = model(features=x, prompts=longer, targets=targets).loss
        single = [model(features=x[i:i + 1], prompts=longer[i:i + 1], targets=targets[i:i + 1]).loss
                  for i in range(3)]
    torch.testing.assert_close(batch, sum(l * n for l, n in zip(single, counts)) / sum(counts), atol=1e-5, rtol=0)
    assert model.llm.training is False


def test_sample_loss_reduction_weighs_every_sample_equally(tiny_dir):
    token = make(tiny_dir, memory="mbc", memory_length=3)
    sample = make(tiny_dir, memory="mbc", memory_length=3, loss_reduction="sample")
    x = features(T=3)
    targets = ["red", "up up down", "star"]
    with torch.no_grad():
        single = [token(features=x[i:i + 1], prompts=PROMPTS[i:i + 1], targets=targets[i:i + 1]).loss
                  for i in range(3)]
        batch = sample(features=x, prompts=PROMPTS, targets=targets).loss
        # one sample: both reductions agree
        one = sample(features=x[1:2], prompts=PROMPTS[1:2], targets=targets[1:2]).loss
    torch.testing.assert_close(batch, torch.stack(single).mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(one, single[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        MALMMConfig(loss_reduction="mean")


def test_train_mode_keeps_llm_frozen_in_eval(tiny_dir):
    model = make(tiny_dir).train()
    assert model.training and model.qformer.training and not model.llm.training
    names = {n for n, _ in model.named_trainable_parameters()}
    assert {"query_tokens", "frame_position_embedding", "ln_vision.weight", "language_projection.weight"} <= names
    assert not any(n.startswith("llm.") for n in names)
    assert set(model.trainable_state_dict()) == names


# ----------------------------------------------------------------------------- generation

def test_generate_batched_equals_one_at_a_time(tiny_dir):
    model = make(tiny_dir, memory="mbc", memory_length=3)
    x = features(T=4)
    prompts = ["what colour was the first object ?", "where ?", PROMPTS[2]]
    kw = dict(num_beams=3, max_new_tokens=4, num_return_sequences=3, repetition_penalty=1.5, length_penalty=0.0)
    batched, counts = model.generate(x, prompts, return_num_tokens=True, **kw)
    singles = [model.generate(x[i:i + 1], prompts[i:i + 1], **kw)[0] for i in range(3)]
    assert batched == singles
    assert len(batched) == 3 and all(len(b) == 3 for b in batched)
    assert all(1 <= c <= 4 for row in counts for c in row)
