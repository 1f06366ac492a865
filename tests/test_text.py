"""Text side: the CLIP tokenizer, ComfyUI's prompt syntax and chunking, the CLIP text model, checkpoint
conversion, and prompt encoding.

Oracles: `transformers.CLIPTokenizer` built from the same vocabulary, `transformers.CLIPTextModelWithProjection`
with the same random weights, and token/weight lists written out by hand from ComfyUI's rules
(comfy/sd1_clip.py). Observed maximum absolute errors (float32, CPU) are stated beside each tolerance.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from engine.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    ClipCheckpointError,
    convert_clip_state_dict,
    load_clip,
)
from engine.text.encode import TextEncoder
from engine.text.tokenizer import (
    ClipTokenizer,
    EmbeddingSource,
    build_bpe,
    escape_parentheses,
    parse_weights,
)

VOCAB_DIR = Path(__file__).resolve().parents[1] / "engine" / "text" / "clip_tokenizer"
S, E = 49406, 49407  # start and end tokens
A, CAT, DOG, COMMA = 320, 2368, 1929, 267
TOL = 2e-5  # observed below 3e-6 for every model comparison in this file


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.CLIPTokenizer(vocab=str(VOCAB_DIR / "vocab.json"), merges=str(VOCAB_DIR / "merges.txt"))


@pytest.fixture(scope="module")
def bpe():
    return build_bpe()


@pytest.fixture(scope="module")
def tok(bpe) -> ClipTokenizer:
    return ClipTokenizer(None, bpe=bpe)


def pairs(chunk):
    return [(t if isinstance(t, int) else "vec", round(w, 6)) for t, w in chunk]


def chunk_of(body, pad=E):
    """A 77-entry chunk: start, `body` (token, weight) pairs, end, padding."""
    out = [(S, 1.0)] + list(body) + [(E, 1.0)]
    return out + [(pad, 1.0)] * (77 - len(out))


# ---------------------------------------------------------------------------------------------------------
# BPE against transformers


FIXED_STRINGS = [
    "a photo of a cat", "Hello, World!!", "it's a dog's life", "don't WON'T y'all", "ÉCOLE café naïve",
    "中文字符 テスト 한국어", "🐱‍👤 emoji 👍🏽 ❤️", "1234567 3.14 1e-5", "a\tb\nc  d\r\ne",
    "<|endoftext|> x",
    "<|ENDOFTEXT|>", "\x0b\x0c weird \u200d zwj \u00ad shy", "İstanbul ß ﬁ Ⅻ ½ ²", "..., ;;; (()) [x] {y} <z>",
    "", "   ", "x" * 300, "\ufffd", "masterpiece, best quality, 8k, ultra-detailed", "a_b-c.d/e\\f",
]


def _random_strings(n: int, seed: int) -> list[str]:
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r  ,.;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
        + list("éèêëàâäôöûüçñßÆØÅœ") + list("中文字日本語한국어") + list("ÀÉÎÕÜ")
        + ["\u0301", "\u200d", "\ufe0f", "\u00a0", "\u2003", "🐱", "👍", "🏽", "❤"]
        + ["½", "²", "Ⅻ", "٣", "İ", "ﬁ"]
        + ["'s", "'t", "'re", "'ll", "<|endoftext|>"]
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_bpe_matches_transformers_clip_tokenizer(hf_tokenizer, bpe):
    mismatches = []
    for text in FIXED_STRINGS + _random_strings(400, seed=0):
        expected = hf_tokenizer(text)["input_ids"]
        got = [S] + bpe.encode(text, add_special_tokens=False).ids + [E]
        if got != expected:
            mismatches.append((text, expected, got))
    assert not mismatches, mismatches[:3]
    assert hf_tokenizer("a photo of a cat")["input_ids"] == [S, 320, 1125, 539, 320, 2368, E]


# ---------------------------------------------------------------------------------------------------------
# Prompt weights


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(cat:1.5)", [("cat", 1.5)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("a (b:0.5) c", [("a ", 1.0), ("b", 0.5), (" c", 1.0)]),
        ("(a (b:1.3) c:0.8)", [("a ", 0.8), ("b", 1.3), (" c", 0.8)]),
        ("(a (b) c)", [("a ", 1.1), ("b", 1.1 * 1.1), (" c", 1.1)]),
        ("(cat:abc)", [("cat:abc", 1.1)]),  # not a number: the colon stays text, weight x1.1
        ("(:1.5)", [(":1.5", 1.1)]),  # a colon at position 0 is text
        ("(cat: 1.2 )", [("cat", 1.2)]),  # Python's float() ignores the spaces
        ("(cat", [("(cat", 1.0)]),  # never closed: plain text
        ("cat)", [("cat)", 1.0)]),
        ("", []),
    ],
)
def test_parse_weights(text, expected):
    assert parse_weights(escape_parentheses(text)) == expected


def test_weighted_tokens(tok):
    assert pairs(tok.tokenize_with_weights("a (cat:1.5)")[0]) == pairs(chunk_of([(A, 1.0), (CAT, 1.5)]))
    assert pairs(tok.tokenize_with_weights("((cat))")[0]) == pairs(chunk_of([(CAT, 1.21)]))
    # Escaped parentheses are literal text with weight 1: "(x)" -> "(", "x", ")".
    assert pairs(tok.tokenize_with_weights("\\(x\\)")[0]) == pairs(chunk_of([(263, 1.0), (343, 1.0), (264, 1.0)]))
    assert tok.tokenize_with_weights("") == [chunk_of([])]


def test_padding_token_per_encoder(bpe):
    assert ClipTokenizer(None, bpe=bpe).tokenize_with_weights("cat")[0][-1] == (E, 1.0)
    assert ClipTokenizer(0, bpe=bpe).tokenize_with_weights("cat") == [chunk_of([(CAT, 1.0)], pad=0)]


# ---------------------------------------------------------------------------------------------------------
# Chunking


def test_long_prompt_splits_into_two_chunks(tok):
    chunks = tok.tokenize_with_weights("cat " * 100)
    # One weighted segment is one "word" of 100 tokens, long enough (>= 8) to be split at the window edge.
    assert chunks == [chunk_of([(CAT, 1.0)] * 75), chunk_of([(CAT, 1.0)] * 25)]
    assert all(len(c) == 77 for c in chunks)


def test_short_word_moves_whole_to_next_chunk(tok):
    group = "(" + " ".join(["cat"] * 7) + ":1.2)"  # a 7-token word
    chunks = tok.tokenize_with_weights(" ".join([group] * 11))
    first = [(S, 1.0)] + [(CAT, 1.2)] * 70 + [(E, 1.0)] + [(E, 1.0)] * 5
    assert pairs(chunks[0]) == pairs(first)
    assert pairs(chunks[1]) == pairs(chunk_of([(CAT, 1.2)] * 7))
    assert len(chunks) == 2


def test_long_word_is_split_at_the_chunk_edge(tok):
    group = "(" + " ".join(["cat"] * 7) + ":1.2)"
    long_word = "(" + " ".join(["dog"] * 8) + ":0.9)"  # 8 tokens: ComfyUI's max_word_length
    chunks = tok.tokenize_with_weights(" ".join([group] * 10 + [long_word]))
    assert pairs(chunks[0]) == pairs([(S, 1.0)] + [(CAT, 1.2)] * 70 + [(DOG, 0.9)] * 5 + [(E, 1.0)])
    assert pairs(chunks[1]) == pairs(chunk_of([(DOG, 0.9)] * 3))


def test_exactly_75_tokens_fit_one_chunk(tok):
    assert tok.tokenize_with_weights("cat " * 75) == [chunk_of([(CAT, 1.0)] * 75)]


# ---------------------------------------------------------------------------------------------------------
# Textual-inversion embeddings


@pytest.fixture
def embeddings(tmp_path) -> EmbeddingSource:
    torch.manual_seed(0)
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    safetensors.torch.save_file({"emb_params": torch.randn(2, 768)}, str(folder / "two.safetensors"))
    xl = {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}
    safetensors.torch.save_file(xl, str(folder / "xl.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(3, 768)}, "name": "a1111"}, folder / "a1111.pt")
    torch.save(torch.randn(768), folder / "sub" / "bare.bin")
    (tmp_path / "outside.pt").write_bytes(b"not reachable")
    return EmbeddingSource.of(folder)


def test_embedding_vectors_replace_tokens(tok, embeddings):
    chunk = tok.tokenize_with_weights("a embedding:two cat", embeddings)[0]
    assert pairs(chunk) == pairs(chunk_of([(A, 1.0), ("vec", 1.0), ("vec", 1.0), (CAT, 1.0)]))
    expected = safetensors.torch.load_file(str(embeddings.folders[0] / "two.safetensors"))["emb_params"]
    assert torch.equal(chunk[2][0], expected[0]) and torch.equal(chunk[3][0], expected[1])


def test_embedding_formats_and_weights(bpe, embeddings):
    tok_l = ClipTokenizer(None, embedding_size=768, embedding_key="clip_l", bpe=bpe)
    tok_g = ClipTokenizer(0, embedding_size=1280, embedding_key="clip_g", bpe=bpe)
    a1111 = tok_l.tokenize_with_weights("(embedding:a1111:1.2)", embeddings)[0]
    assert pairs(a1111) == pairs(chunk_of([("vec", 1.2)] * 3))
    assert tok_l.tokenize_with_weights("embedding:xl", embeddings)[0][1][0].shape == (768,)
    assert tok_g.tokenize_with_weights("embedding:xl", embeddings)[0][1][0].shape == (1280,)
    bare = tok_l.tokenize_with_weights("embedding:bare", embeddings)[0]  # found in a subfolder, 1-D tensor
    assert pairs(bare) == pairs(chunk_of([("vec", 1.0)]))
    # A trailing comma is not part of the name: it stays as text after the vectors.
    comma = tok_l.tokenize_with_weights("embedding:bare, cat", embeddings)[0]
    assert pairs(comma) == pairs(chunk_of([("vec", 1.0), (COMMA, 1.0), (CAT, 1.0)]))


def test_missing_embedding_is_logged_and_dropped(tok, embeddings, caplog):
    with caplog.at_level(logging.WARNING):
        chunk = tok.tokenize_with_weights("embedding:nothing cat", embeddings)[0]
    assert chunk == chunk_of([(CAT, 1.0)])
    assert "nothing" in caplog.text
    # Names never leave the folder.
    assert tok.tokenize_with_weights("embedding:../outside cat", embeddings)[0] == chunk_of([(CAT, 1.0)])


def test_embedding_syntax_is_text_without_a_source(tok, bpe):
    chunk = tok.tokenize_with_weights("embedding:two cat")[0]
    assert chunk == chunk_of([(t, 1.0) for t in bpe.encode("embedding:two cat", add_special_tokens=False).ids])


# ---------------------------------------------------------------------------------------------------------
# The text model against transformers


def hf_model(width: int, layers: int, heads: int, activation: str, projection: int, seed: int):
    """A transformers CLIPTextModelWithProjection with every parameter random."""
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=activation, projection_dim=projection,
        bos_token_id=S, eos_token_id=E, pad_token_id=1, layer_norm_eps=1e-5,
    )
    config._attn_implementation = "eager"
    model = transformers.CLIPTextModelWithProjection(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def ours_from_hf(hf, prefix="cond_stage_model.transformer.", heads=None, activation=None, projection=True):
    hsd = hf.state_dict()
    sd = {prefix + k: v.clone() for k, v in hsd.items() if projection or not k.startswith("text_projection")}
    sd[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old checkpoints carry it
    return load_clip(sd, prefix, heads=heads, activation=activation)


def sample_ids(pad: int) -> torch.Tensor:
    rows = [[S, 320, 1125, 539, 320, 2368, E], [S, 2368, 267, 1929, 320, 22, 1125, 8, 539, E]]
    return torch.tensor([r + [pad] * (77 - len(r)) for r in rows])


@pytest.mark.parametrize("activation, pad", [("quick_gelu", E), ("gelu", 0)])
def test_model_matches_transformers(activation, pad):
    hf = hf_model(64, 3, 4, activation, 48, seed=1)
    # The HF layout at a width other than ViT-H's or bigG's reads as OpenAI CLIP-L (quick-GELU) unless told.
    ours = ours_from_hf(hf, heads=4, activation=None if activation == "quick_gelu" else activation)
    assert ours.config.activation == activation
    ids = sample_ids(pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        errors = {}
        for layer in range(-3, 3):
            out = ours(ids, hidden_layer=layer)
            errors[f"hidden {layer}"] = (out.hidden_state - ref.hidden_states[layer % 3 + 1]).abs().max().item()
        out = ours(ids, hidden_layer=-2, normalize_hidden=True)
        normalized = hf.text_model.final_layer_norm(ref.hidden_states[-2])
        errors["hidden -2 + LN"] = (out.hidden_state - normalized).abs().max().item()
        errors["last"] = (out.last_hidden_state - ref.last_hidden_state).abs().max().item()
        errors["projected"] = (out.projected - ref.text_embeds).abs().max().item()
        pooled_ref = hf.text_model(input_ids=ids).pooler_output
        errors["pooled"] = (out.pooled - pooled_ref).abs().max().item()
    assert max(errors.values()) < TOL, errors


def test_model_without_projection_and_with_input_embeddings():
    hf = hf_model(64, 2, 2, "quick_gelu", 64, seed=2)
    ours = ours_from_hf(hf, heads=2, projection=False)
    assert ours.text_projection is None and ours.config.projection_dim is None
    ids = sample_ids(E)
    table = ours.text_model.embeddings.token_embedding.weight
    chunks = [[table[t].clone() if t == 2368 else t for t in row] for row in ids.tolist()]
    placeholder_ids, embeds = ours.embed(chunks)
    with torch.no_grad():
        from_vectors = ours(placeholder_ids, embeds)
        from_ids = ours(ids)
        ref = hf.text_model(input_ids=ids)
    assert torch.equal(from_vectors.last_hidden_state, from_ids.last_hidden_state)
    assert torch.equal(from_vectors.pooled, from_ids.pooled)
    err = (from_ids.pooled - ref.pooler_output).abs().max().item()
    assert err < TOL, err
    assert from_vectors.projected is None


def test_embed_drops_vectors_of_the_wrong_width(caplog):
    ours = ours_from_hf(hf_model(64, 1, 2, "gelu", 64, seed=3), heads=2)
    row = [S, torch.zeros(32), CAT, E] + [0] * 73
    with caplog.at_level(logging.WARNING):
        ids, _ = ours.embed([row], pad_token=0)
    assert ids[0].tolist() == [S, CAT, E] + [0] * 74
    assert "32" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layouts


def openclip_from_hf(hf, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP-layout tensors of a transformers model (written independently of the engine's map)."""
    return openclip_from_hf_names(hf.state_dict(), hf.config.num_hidden_layers, prefix)


def openclip_from_hf_names(hsd, layers: int, prefix: str) -> dict[str, torch.Tensor]:
    out = {
        prefix + "token_embedding.weight": hsd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": hsd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": hsd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": hsd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": hsd["text_projection.weight"].T.contiguous(),
        prefix + "logit_scale": torch.tensor(4.6),
    }
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for ours_name, theirs in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                                  ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                                  ("mlp.c_proj", "mlp.fc2")]:
            for kind in ("weight", "bias"):
                out[f"{dst}{ours_name}.{kind}"] = hsd[f"{src}{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = [hsd[f"{src}self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
    return out


def test_openclip_conversion_matches_transformers():
    hf = hf_model(96, 3, 2, "gelu", 80, seed=4)
    prefix = "conditioner.embedders.1.model."
    sd = openclip_from_hf(hf, prefix)
    other_encoder = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    sd[other_encoder] = torch.zeros(1, 1)  # outside the prefix: not looked at
    converted, config = convert_clip_state_dict(sd, prefix, heads=2)
    assert config == CLIPTextConfig(width=96, layers=3, heads=2, mlp_width=384, activation="gelu", projection_dim=80)
    assert set(converted) == set(hf.state_dict())
    ours = load_clip(sd, prefix, heads=2)
    ids = sample_ids(0)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids, hidden_layer=-2)
    errors = {
        "hidden -2": (out.hidden_state - ref.hidden_states[-2]).abs().max().item(),
        "last": (out.last_hidden_state - ref.last_hidden_state).abs().max().item(),
        "projected": (out.projected - ref.text_embeds).abs().max().item(),
    }
    assert max(errors.values()) < TOL, errors


def test_full_size_configs_are_detected_from_shapes():
    with torch.device("meta"):
        big_g = CLIPTextModel(CLIPTextConfig.vit_bigg())
        vit_h = CLIPTextModel(CLIPTextConfig.vit_h())
        clip_l = CLIPTextModel(CLIPTextConfig.clip_l())
    prefix = "conditioner.embedders.1.model."
    openclip_g = openclip_from_hf_names(big_g.state_dict(), 32, prefix)
    assert convert_clip_state_dict(openclip_g, prefix)[1] == CLIPTextConfig.vit_bigg()
    prefix = "cond_stage_model.model."
    openclip_h = openclip_from_hf_names(vit_h.state_dict(), 24, prefix)
    assert convert_clip_state_dict(openclip_h, prefix)[1] == CLIPTextConfig.vit_h()
    prefix = "cond_stage_model.transformer."
    hf_l = {prefix + k: v for k, v in clip_l.state_dict().items()}
    assert convert_clip_state_dict(hf_l, prefix)[1] == CLIPTextConfig.clip_l()
    legacy = {prefix + k.removeprefix("text_model."): v for k, v in clip_l.state_dict().items()}  # no "text_model."
    assert convert_clip_state_dict(legacy, prefix)[1] == CLIPTextConfig.clip_l()
    # SDXL's bigG as a separate Hugging Face-layout file is still GELU.
    assert convert_clip_state_dict(big_g.state_dict(), "")[1].activation == "gelu"


def test_conversion_errors_name_the_key():
    hf = hf_model(64, 2, 2, "gelu", 64, seed=5)
    prefix = "cond_stage_model.model."
    sd = openclip_from_hf(hf, prefix)
    bad = dict(sd)
    bad[prefix + "transformer.resblocks.1.mlp.c_proj.weight"] = torch.zeros(64, 100)
    with pytest.raises(ClipCheckpointError) as info:
        convert_clip_state_dict(bad, prefix, heads=2)
    assert info.value.key == "text_model.encoder.layers.1.mlp.fc2.weight"
    assert prefix + "transformer.resblocks.1.mlp.c_proj.weight" in str(info.value)  # the checkpoint's own name too
    missing = dict(sd)
    del missing[prefix + "ln_final.bias"]
    with pytest.raises(ClipCheckpointError) as info:
        convert_clip_state_dict(missing, prefix, heads=2)
    assert info.value.key == "text_model.final_layer_norm.bias"
    with pytest.raises(ClipCheckpointError, match="no CLIP text encoder"):
        convert_clip_state_dict(sd, "cond_stage_model.transformer.")


# ---------------------------------------------------------------------------------------------------------
# Prompt encoding


@pytest.fixture(scope="module")
def hf_l():
    return hf_model(64, 3, 4, "quick_gelu", 64, seed=10)


@pytest.fixture(scope="module")
def hf_g():
    return hf_model(96, 3, 2, "gelu", 80, seed=11)


@pytest.fixture(scope="module")
def hf_h():
    return hf_model(64, 3, 2, "gelu", 48, seed=12)


@pytest.fixture(scope="module")
def sd1(hf_l) -> TextEncoder:
    return TextEncoder.sd1(ours_from_hf(hf_l, heads=4, projection=False))


@pytest.fixture(scope="module")
def sdxl(hf_l, hf_g) -> TextEncoder:
    prefix = "conditioner.embedders.1.model."
    clip_g = load_clip(openclip_from_hf(hf_g, prefix), prefix, heads=2)
    clip_l = ours_from_hf(hf_l, "conditioner.embedders.0.transformer.", heads=4, projection=False)
    return TextEncoder.sdxl(clip_l, clip_g)


def ref_states(hf, chunks):
    ids = torch.tensor([[t for t, _ in c] for c in chunks])
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
    return out, ids


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


def test_sd1_layers(sd1, hf_l):
    text = "a photo of a cat " * 20  # two chunks
    chunks = sd1.tokenize(text)["l"]
    ref, ids = ref_states(hf_l, chunks)
    ln = hf_l.text_model.final_layer_norm
    cond, pooled = sd1.encode(text)
    assert cond.shape == (1, 154, 64) and pooled.shape == (1, 64) and cond.dtype == torch.float32
    with torch.no_grad():
        errors = {"last": max_err(cond, ref.last_hidden_state.reshape(1, 154, 64))}
        errors["pooled (unprojected, first chunk)"] = max_err(pooled, hf_l.text_model(input_ids=ids).pooler_output[0:1])
        skip2, _ = sd1.encode(text, clip_skip=-2)
        skip1, _ = sd1.encode(text, clip_skip=-1)
        beyond, _ = sd1.encode(text, clip_skip=-24)  # deeper than 3 layers: the final LN output
        errors["clip_skip -2"] = max_err(skip2, ln(ref.hidden_states[-2]).reshape(1, 154, 64))
    errors["clip_skip -1"] = max_err(skip1, cond)
    errors["clip_skip -24"] = max_err(beyond, cond)
    assert max(errors.values()) < TOL, errors


def test_weights_interpolate_against_the_empty_prompt(sd1, hf_l):
    plain, _ = sd1.encode("a cat dog")
    unit, _ = sd1.encode("(a cat dog:1.0)")
    assert torch.equal(plain, unit)  # all weights 1: no empty-prompt pass, identical numbers

    empty_ref, _ = ref_states(hf_l, sd1.tokenize("")["l"])
    plain_ref, _ = ref_states(hf_l, sd1.tokenize("a cat dog")["l"])
    z, ze = plain_ref.last_hidden_state[0], empty_ref.last_hidden_state[0]
    weighted, _ = sd1.encode("a (cat:1.5) (dog:0)")
    expected = z.clone()
    expected[2] = (z[2] - ze[2]) * 1.5 + ze[2]
    expected[3] = ze[3]  # weight 0: the empty prompt's embedding at that position
    err = max_err(weighted[0], expected)
    assert err < TOL, err
    assert max_err(weighted[0, 3], ze[3]) < TOL


def test_embedding_vector_equal_to_a_token_row_encodes_like_the_token(sd1, tmp_path):
    table = sd1.branches["l"].model.text_model.embeddings.token_embedding.weight
    safetensors.torch.save_file({"emb_params": table[CAT][None].clone()}, str(tmp_path / "catlike.safetensors"))
    source = EmbeddingSource.of(tmp_path)
    via_embedding, p1 = sd1.encode("a embedding:catlike dog", embeddings=source)
    via_token, p2 = sd1.encode("a cat dog", embeddings=source)
    assert torch.equal(via_embedding, via_token) and torch.equal(p1, p2)


def test_sdxl_concatenates_penultimate_states(sdxl, hf_l, hf_g):
    text = "a photo of a (cat:1.2)"
    cond, pooled = sdxl.encode(text)
    assert cond.shape == (1, 77, 64 + 96) and pooled.shape == (1, 80)
    tokens = sdxl.tokenize(text)
    assert tokens["g"][0][-1] == (0, 1.0) and tokens["l"][0][-1] == (E, 1.0)
    ref_l, _ = ref_states(hf_l, tokens["l"])
    ref_g, _ = ref_states(hf_g, tokens["g"])
    empty_l, _ = ref_states(hf_l, sdxl.tokenize("")["l"])
    empty_g, _ = ref_states(hf_g, sdxl.tokenize("")["g"])

    def weighted(z, ze):
        z = z.clone()
        z[5] = (z[5] - ze[5]) * 1.2 + ze[5]  # "cat" sits at position 5: start, a, photo, of, a, cat
        return z

    expected = torch.cat([weighted(ref_l.hidden_states[-2][0], empty_l.hidden_states[-2][0]),
                          weighted(ref_g.hidden_states[-2][0], empty_g.hidden_states[-2][0])], dim=-1)
    errors = {"cond": max_err(cond[0], expected), "pooled": max_err(pooled, ref_g.text_embeds[0:1])}
    last, _ = sdxl.encode("a cat", clip_skip=-1)  # CLIPSetLastLayer -1: last layer, still not normalised
    ref_l1, _ = ref_states(hf_l, sdxl.tokenize("a cat")["l"])
    errors["clip_skip -1 (l half)"] = max_err(last[0, :, :64], ref_l1.hidden_states[-1][0])
    assert max(errors.values()) < TOL, errors


def test_sdxl_separate_prompts_pad_with_empty_chunks(sdxl, hf_g):
    cond, pooled = sdxl.encode_sdxl_parts("cat " * 100, "a dog")
    assert cond.shape == (1, 154, 160)
    empty_g, _ = ref_states(hf_g, sdxl.tokenize("")["g"])
    dog_g, _ = ref_states(hf_g, sdxl.tokenize("a dog")["g"])
    errors = {
        "g second chunk = empty prompt": max_err(cond[0, 77:, 64:], empty_g.hidden_states[-2][0]),
        "pooled from the g prompt's first chunk": max_err(pooled, dog_g.text_embeds),
    }
    assert max(errors.values()) < TOL, errors
    long_l, _ = sdxl.encode("cat " * 100)
    assert torch.equal(cond[:, :, :64], long_l[:, :, :64])


def test_sd2_and_refiner_defaults(hf_g, hf_h):
    prefix = "cond_stage_model.model."
    sd2 = TextEncoder.sd2(load_clip(openclip_from_hf(hf_h, prefix), prefix, heads=2))
    refiner = TextEncoder.sdxl_refiner(load_clip(openclip_from_hf(hf_g, prefix), prefix, heads=2))
    text = "a photo of a cat"
    cond_h, pooled_h = sd2.encode(text)
    cond_g, pooled_g = refiner.encode(text)
    assert cond_h.shape == (1, 77, 64) and pooled_h.shape == (1, 48)
    assert cond_g.shape == (1, 77, 96) and pooled_g.shape == (1, 80)
    tokens = sd2.tokenize(text)["h"]
    assert tokens[0][-1] == (0, 1.0)  # OpenCLIP pads with 0
    ref_h, _ = ref_states(hf_h, tokens)
    ref_g, _ = ref_states(hf_g, refiner.tokenize(text)["g"])
    with torch.no_grad():
        errors = {
            "sd2 penultimate + LN": max_err(cond_h[0], hf_h.text_model.final_layer_norm(ref_h.hidden_states[-2])[0]),
            "sd2 pooled projected": max_err(pooled_h, ref_h.text_embeds),
            "refiner penultimate": max_err(cond_g[0], ref_g.hidden_states[-2][0]),
            "refiner pooled projected": max_err(pooled_g, ref_g.text_embeds),
        }
    assert max(errors.values()) < TOL, errors


def test_sdxl_parts_need_sdxl(sd1):
    with pytest.raises(ValueError, match="SDXL"):
        sd1.encode_sdxl_parts("a", "b")
