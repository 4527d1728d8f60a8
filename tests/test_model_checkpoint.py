"""Loading and saving weights: HF InstructBLIP directories, our checkpoints, LAVIS / MA-LMM releases,
and the tiny default builder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.model.checkpoint import (hf_to_malmm_keys, lavis_to_hf_keys, load_checkpoint, load_malmm,
                                       load_vision_model, read_checkpoint_config, read_tensors, save_checkpoint)
from pipeline.model.modeling_malmm import MALMMConfig
from pipeline.model.tiny import build_tiny_instructblip, sample_corpus

PROMPTS = ["what colour was the first object ?", "where did the last object move ?"]
CORPUS = sample_corpus(400)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_instructblip(tmp_path_factory.mktemp("tiny") / "model", CORPUS, pretrain_steps=40)


def features(B=2, T=4, seed=0):
    return torch.randn(B, T, 17, 64, generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=1):
    """Pretend to train: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ----------------------------------------------------------------------------- tiny builder

def test_tiny_builder_writes_a_real_instructblip_directory(tiny_dir):
    info = json.loads((tiny_dir / "tiny_info.json").read_text())
    assert info["seed"] == 0 and info["pretrain_steps"] == 40
    assert info["final_lm_loss"] < info["initial_lm_loss"] - 1.0  # the frozen LLM learnt the corpus
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "instructblip"
    assert cfg["vision_config"]["initializer_range"] == 0.02
    assert cfg["qformer_config"]["cross_attention_frequency"] == 2
    assert cfg["qformer_config"]["encoder_hidden_size"] == cfg["vision_config"]["hidden_size"]
    assert (tiny_dir / "qformer_tokenizer").is_dir()
    assert not list(tiny_dir.parent.glob(".*tmp*"))  # built aside, renamed into place


def test_tiny_builder_refuses_to_overwrite(tiny_dir):
    with pytest.raises(FileExistsError):
        build_tiny_instructblip(tiny_dir, CORPUS, pretrain_steps=1)


def test_tiny_loads_like_a_real_checkpoint(tiny_dir):
    from transformers import InstructBlipForConditionalGeneration

    model = load_malmm(tiny_dir, MALMMConfig(max_frames=8))
    ref = InstructBlipForConditionalGeneration.from_pretrained(tiny_dir)
    sd = ref.state_dict()
    assert torch.equal(model.query_tokens, sd["query_tokens"])
    assert model.query_tokens.std() > 0.005  # not HF's all-zero init: 32 distinct queries
    assert torch.equal(model.ln_vision.weight, sd["vision_model.post_layernorm.weight"])
    assert torch.equal(model.language_projection.weight, sd["language_projection.weight"])
    assert torch.equal(model.llm.lm_head.weight, sd["language_model.lm_head.weight"])
    for k, v in model.qformer.state_dict().items():
        assert torch.equal(v, sd["qformer." + k]), k
    assert torch.count_nonzero(model.frame_position_embedding) == 0
    assert not any(p.requires_grad for p in model.llm.parameters())
    # the tokenizers are real: words round-trip, the LLM one adds <s>, the Q-Former one [CLS] .. [SEP]
    ids = model.tokenizer("Red circle moves LEFT")["input_ids"]
    assert ids[0] == model.tokenizer.bos_token_id and model.tokenizer.unk_token_id not in ids
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "red circle moves left"
    q = model.qformer_tokenizer("what colour ?")["input_ids"]
    assert q[0] == model.qformer_tokenizer.cls_token_id and q[-1] == model.qformer_tokenizer.sep_token_id


def test_frame_position_init_zeros_or_sinusoidal(tiny_dir):
    from pipeline.model.modeling_malmm import SINUSOIDAL_AMPLITUDE, sinusoidal_table

    pe = load_malmm(tiny_dir, MALMMConfig(max_frames=12, frame_position_init="sinusoidal")).frame_position_embedding
    assert torch.equal(pe.detach(), sinusoidal_table(12, 64))
    # every frame has its own row (the order of stored frames stays readable), of the documented amplitude
    assert torch.cdist(pe, pe).add(torch.eye(12) * 99).min() > 0.3
    assert torch.isclose(pe.abs().max(), torch.tensor(SINUSOIDAL_AMPLITUDE), atol=1e-3)
    with pytest.raises(ValueError, match="frame_position_init"):
        MALMMConfig(frame_position_init="random")


def test_lm_text_layout_puts_the_context_where_the_video_tokens_go(tiny_dir):
    from transformers import AutoTokenizer

    from pipeline.model.tiny import encode_lm_text

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids, labels = encode_lm_text(tok, "red circle , blue square . <s> what colour was the first object ? red", 8)
    words = tok.convert_ids_to_tokens(ids)
    # context, filled to 8 positions with <image>, then <s> prompt answer </s>; the context is given,
    # like video tokens: no loss on any of its 8 positions
    assert words[:8] == ["red", "circle", ",", "blue", "square", ".", "<image>", "<image>"]
    assert words[8] == "<s>" and words[-2:] == ["red", "</s>"]
    assert labels[:8] == [-100] * 8 and labels[8:] == ids[8:]
    plain, plain_labels = encode_lm_text(tok, "red circle moves left", 8)
    assert tok.convert_ids_to_tokens(plain) == ["<s>", "red", "circle", "moves", "left", "</s>"]
    assert plain_labels == plain


def test_qformer_image_pretraining_trains_only_the_trainable_parts(tmp_path):
    """The tiny builder's InstructBLIP-style stage: Q-Former, queries, projection and post layer norm
    change; the ViT body and the LLM do not; load_malmm then starts from the pretrained parts."""
    from transformers import InstructBlipForConditionalGeneration

    from pipeline import synth

    before = build_tiny_instructblip(tmp_path / "plain", CORPUS, pretrain_steps=5)
    after = build_tiny_instructblip(tmp_path / "pre", CORPUS, pretrain_steps=5, num_query_tokens=6,
                                    image_corpus=synth.frame_corpus(300, seed=1), qformer_steps=4,
                                    qformer_frame_positions=6)
    a = InstructBlipForConditionalGeneration.from_pretrained(before).state_dict()
    b = InstructBlipForConditionalGeneration.from_pretrained(after).state_dict()
    trainable = ("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm.")
    changed = {k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(trainable) for k in changed)
    assert any(k.startswith("qformer.") for k in changed) and "query_tokens" in changed
    info = json.loads((after / "tiny_info.json").read_text())["qformer_pretraining"]
    assert info["steps"] == 4 and 0.0 <= info["held_out_accuracy"] <= 1.0 and info["held_out"] == 256
    assert info["frame_positions"] == 6 and b["query_tokens"].shape[1] == 6
    model = load_malmm(after, MALMMConfig(max_frames=4))
    torch.testing.assert_close(model.query_tokens.detach(), b["query_tokens"])
    torch.testing.assert_close(model.ln_vision.weight.detach(), b["vision_model.post_layernorm.weight"])


def test_vision_model_from_full_and_vision_only_dirs(tiny_dir, tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    ref = InstructBlipForConditionalGeneration.from_pretrained(tiny_dir).vision_model.eval()
    full = load_vision_model(tiny_dir)
    ref.save_pretrained(tmp_path / "vision")
    alone = load_vision_model(tmp_path / "vision")
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(px).last_hidden_state
        assert torch.equal(full(px).last_hidden_state, expected)
        assert torch.equal(alone(px).last_hidden_state, expected)
        h = full.encoder(inputs_embeds=full.embeddings(px)).last_hidden_state
    assert 0.05 < float(h.std()) < 10  # a normal feature scale (initializer_range 0.02, not 1e-10)


def test_sharded_checkpoint_and_selective_reads(tiny_dir, tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_dir, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    InstructBlipForConditionalGeneration.from_pretrained(tiny_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    tensors = read_tensors(sharded, ("qformer.", "vision_model.post_layernorm."))
    assert tensors and all(k.startswith(("qformer.", "vision_model.post_layernorm.")) for k in tensors)
    a, b = load_malmm(tiny_dir), load_malmm(sharded)
    with torch.no_grad():
        x = features()
        torch.testing.assert_close(a.encode_video(x, PROMPTS), b.encode_video(x, PROMPTS), atol=0, rtol=0)


# ----------------------------------------------------------------------------- our checkpoints

def test_checkpoint_round_trip(tiny_dir, tmp_path):
    cfg = MALMMConfig(memory="mbc", memory_length=2, max_frames=8)
    model = load_malmm(tiny_dir, cfg)
    perturb(model)
    save_checkpoint(model, tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / "malmm_config.json").read_text())
    assert info["malmm"]["memory_length"] == 2 and info["base_model_dir"] == str(tiny_dir.resolve())
    assert read_checkpoint_config(tmp_path / "ckpt") == cfg
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ckpt" / "trainable.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.trainable_state_dict()) and not any(k.startswith("llm.") for k in keys)

    # load_malmm(checkpoint=...) and load_checkpoint on a fresh model both restore it exactly
    restored = load_malmm(tiny_dir, checkpoint=tmp_path / "ckpt")  # config read from the checkpoint
    assert restored.config == cfg
    fresh = load_malmm(tiny_dir, cfg)
    load_checkpoint(fresh, tmp_path / "ckpt" / "trainable.safetensors")
    x = features()
    with torch.no_grad():
        expected = model.encode_video(x, PROMPTS)
        for other in (restored, fresh):
            torch.testing.assert_close(other.encode_video(x, PROMPTS), expected, atol=0, rtol=0)
        base = load_malmm(tiny_dir, cfg).encode_video(x, PROMPTS)
    assert not torch.allclose(base, expected)
    kw = dict(num_beams=2, max_new_tokens=3, num_return_sequences=2)
    assert restored.generate(x, PROMPTS, **kw) == model.generate(x, PROMPTS, **kw)
    # the train stage resumes with a plain load_state_dict on these names
    from safetensors.torch import load_file
    fresh2 = load_malmm(tiny_dir, cfg)
    result = fresh2.load_state_dict(load_file(str(tmp_path / "ckpt" / "trainable.safetensors")), strict=False)
    assert not result.unexpected_keys


def test_damaged_checkpoint_weights_are_refused(tiny_dir, tmp_path):
    """Every checkpoint records the checksum of its weights file and is verified on load."""
    from pipeline.model.checkpoint import CorruptCheckpointError
    model = load_malmm(tiny_dir, MALMMConfig(memory="mbc", memory_length=2, max_frames=8))
    save_checkpoint(model, tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / "malmm_config.json").read_text())
    assert info["weights_sha256"].startswith("sha256:")
    load_malmm(tiny_dir, checkpoint=tmp_path / "ckpt")  # intact: loads
    weights = tmp_path / "ckpt" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one tensor: safetensors itself would load it
    weights.write_bytes(bytes(data))
    for load in (lambda: load_malmm(tiny_dir, checkpoint=tmp_path / "ckpt"),
                 lambda: load_checkpoint(load_malmm(tiny_dir), weights)):
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch with malmm_config.json"):
            load()


def test_checkpoint_with_other_shapes_is_a_clear_error(tiny_dir, tmp_path):
    model = load_malmm(tiny_dir, MALMMConfig())
    state = {k: v for k, v in model.trainable_state_dict().items()}
    state["language_projection.weight"] = torch.zeros(3, 3)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="language_projection.weight"):
        load_checkpoint(load_malmm(tiny_dir), tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------- LAVIS / MA-LMM releases

def to_lavis_names(model) -> dict[str, torch.Tensor]:
    """A state dict as LAVIS' blip2_vicuna_instruct_malmm would save it (trainable part)."""
    out = {"query_tokens": model.query_tokens.detach().clone(),
           "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
           "Qformer.cls.predictions.bias": torch.zeros(4), "visual_encoder.cls_token": torch.zeros(1, 1, 8)}
    for k, v in model.qformer.state_dict().items():
        if k == "embeddings.position_ids":
            continue
        k = k.replace("embeddings.layernorm", "embeddings.LayerNorm")
        k = k.replace("attention.attention.", "attention.self.")
        out["Qformer.bert." + k] = v.clone()
    for k, v in model.language_projection.state_dict().items():
        out["llm_proj." + k] = v.clone()
    for k, v in model.ln_vision.state_dict().items():
        out["ln_vision." + k] = v.clone()
    out["image_pe.weight"] = torch.randn(120, model.frame_position_embedding.shape[1]) * 0.1
    return out


def test_lavis_key_mapping_names():
    sd = {"Qformer.bert.encoder.layer.0.crossattention.self.query.weight": 1,
          "Qformer.bert.encoder.layer.3.attention.self.value.bias": 2,
          "Qformer.bert.encoder.layer.0.attention.output.LayerNorm.weight": 3,
          "Qformer.bert.encoder.layer.1.output_query.dense.weight": 4,
          "Qformer.bert.embeddings.LayerNorm.bias": 5,
          "Qformer.bert.embeddings.word_embeddings.weight": 6,
          "Qformer.bert.embeddings.position_ids": 7,
          "Qformer.cls.predictions.transform.dense.weight": 8,
          "llm_proj.weight": 9, "ln_vision.bias": 10, "image_pe.weight": 11, "query_tokens": 12,
          "llm_model.model.layers.0.mlp.up_proj.weight": 13}
    assert lavis_to_hf_keys(sd) == {
        "qformer.encoder.layer.0.crossattention.attention.query.weight": 1,
        "qformer.encoder.layer.3.attention.attention.value.bias": 2,
        "qformer.encoder.layer.0.attention.output.LayerNorm.weight": 3,
        "qformer.encoder.layer.1.output_query.dense.weight": 4,
        "qformer.embeddings.layernorm.bias": 5,
        "qformer.embeddings.word_embeddings.weight": 6,
        "language_projection.weight": 9, "vision_model.post_layernorm.bias": 10,
        "frame_position_embedding": 11, "query_tokens": 12,
        "language_model.model.layers.0.mlp.up_proj.weight": 13}
    assert hf_to_malmm_keys({"vision_model.post_layernorm.weight": 1, "vision_model.encoder.x": 2,
                             "language_model.lm_head.weight": 3, "qformer.a": 4}) == \
        {"ln_vision.weight": 1, "llm.lm_head.weight": 3, "qformer.a": 4}


def test_lavis_checkpoint_loads_with_trust_and_is_refused_without(tiny_dir, tmp_path):
    source = load_malmm(tiny_dir, MALMMConfig(max_frames=120))
    perturb(source, seed=3)
    lavis = to_lavis_names(source)
    path = tmp_path / "malmm_lvu.pth"
    torch.save({"model": lavis, "epoch": 3}, path)

    with pytest.raises(PermissionError, match="trust_pickle"):
        load_malmm(tiny_dir, MALMMConfig(max_frames=120), checkpoint=path)
    with pytest.raises(PermissionError):
        load_checkpoint(load_malmm(tiny_dir), path)

    with pytest.warns(UserWarning, match="ignored 1 tensors"):  # the LAVIS ViT is not part of MALMM
        loaded = load_malmm(tiny_dir, MALMMConfig(max_frames=120), checkpoint=path, trust_pickle=True)
    torch.testing.assert_close(loaded.frame_position_embedding, lavis["image_pe.weight"], atol=0, rtol=0)
    for k, v in source.trainable_state_dict().items():
        if k != "frame_position_embedding":
            assert torch.equal(loaded.state_dict()[k], v), k
    # a smaller frame table takes the first rows
    short = load_malmm(tiny_dir, MALMMConfig(max_frames=20))
    with pytest.warns(UserWarning, match="ignored"):
        load_checkpoint(short, path, trust_pickle=True)
    assert torch.equal(short.frame_position_embedding, lavis["image_pe.weight"][:20])


def test_unrelated_checkpoint_is_rejected(tiny_dir, tmp_path):
    from safetensors.torch import save_file
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="no tensor"):
        load_checkpoint(load_malmm(tiny_dir), tmp_path / "x.safetensors")


def test_not_an_instructblip_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="InstructBLIP"):
        load_malmm(tmp_path)
    with pytest.raises(ValueError):
        load_vision_model(tmp_path)


def test_lavis_import_uses_lavis_ln_vision_eps(tiny_dir, tmp_path):
    """LAVIS' ln_vision is a torch LayerNorm with its default epsilon 1e-5 (HF's post_layernorm: the vision
    config's 1e-6); a LAVIS import runs with LAVIS' epsilon, and a checkpoint saved from it keeps it."""
    import torch.nn.functional as F

    source = load_malmm(tiny_dir, MALMMConfig())
    assert source.ln_vision.eps == 1e-6  # the tiny vision config's layer_norm_eps, as HF InstructBLIP's
    path = tmp_path / "malmm.pth"
    torch.save({"model": to_lavis_names(source)}, path)
    with pytest.warns(UserWarning, match="ignored"):
        loaded = load_malmm(tiny_dir, MALMMConfig(), checkpoint=path, trust_pickle=True)
    assert loaded.ln_vision.eps == 1e-5 and loaded.config.ln_vision_eps == 1e-5
    # features of small variance, where the epsilon matters
    x = features(T=1) * 1e-3
    with torch.no_grad():
        got = loaded.frame_features(x, 0)
        w, b = loaded.ln_vision.weight, loaded.ln_vision.bias
        expected = F.layer_norm(x, (64,), w, b, 1e-5) + loaded.frame_position_embedding[0]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(got, F.layer_norm(x, (64,), w, b, 1e-6) + loaded.frame_position_embedding[0],
                                  atol=1e-3)
    save_checkpoint(loaded, tmp_path / "ours")
    assert load_malmm(tiny_dir, checkpoint=tmp_path / "ours").ln_vision.eps == 1e-5


def test_lavis_saved_config_gives_memory_settings(tiny_dir, tmp_path):
    """A LAVIS .pth carries its run configuration: memory_bank_length L (0 = the no-memory path) and num_frames."""
    lavis = to_lavis_names(load_malmm(tiny_dir, MALMMConfig()))
    runs = {"mbc": {"model": {"arch": "blip2_vicuna_instruct_malmm", "memory_bank_length": 10, "num_frames": 20}},
            "no_memory": {"model": {"memory_bank_length": 0}, "datasets": {"breakfast_cls": {"num_frames": 100}}},
            "bare": None}
    for name, cfg in runs.items():
        obj = {"model": lavis, "epoch": 1} if cfg is None else {"model": lavis, "config": cfg, "epoch": 1}
        torch.save(obj, tmp_path / f"{name}.pth")
    with pytest.warns(UserWarning):
        mbc = load_malmm(tiny_dir, checkpoint=tmp_path / "mbc.pth", trust_pickle=True)
        none = load_malmm(tiny_dir, checkpoint=tmp_path / "no_memory.pth", trust_pickle=True)
    assert (mbc.config.memory, mbc.config.memory_length) == ("mbc", 10)
    assert none.config.memory == "per_frame"
    assert mbc.config.ln_vision_eps == none.config.ln_vision_eps == 1e-5

    from pipeline.model.checkpoint import lavis_recorded_settings
    with pytest.raises(PermissionError, match="trust_pickle"):
        lavis_recorded_settings(tmp_path / "mbc.pth")
    assert lavis_recorded_settings(tmp_path / "mbc.pth", trust_pickle=True) == \
        {"memory_bank_length": 10, "num_frames": 20}
    assert lavis_recorded_settings(tmp_path / "no_memory.pth", trust_pickle=True) == \
        {"memory_bank_length": 0, "num_frames": 100}
    assert lavis_recorded_settings(tmp_path / "bare.pth", trust_pickle=True) == \
        {"memory_bank_length": None, "num_frames": None}
