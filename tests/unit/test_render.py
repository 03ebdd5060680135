"""Masking policies, organizations, truncation, seq2seq, statistics and previews."""

from fractions import Fraction

import numpy as np
import pytest

from chatsft.data.conversation import parse_record
from chatsft.data.preview import to_html, to_terminal
from chatsft.data.render import IGNORE, RenderOptions, render_conversation, render_seq2seq
from chatsft.data.stats import MaskStats, turn_weights
from chatsft.data.templates import TemplateError

DIALOGUE = {"messages": [
    {"role": "user", "content": "Tell me seven words"},
    {"role": "assistant", "content": "one two three four five six seven"},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Yes"},
    {"role": "user", "content": "Really?"},
    {"role": "assistant", "content": "No"}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from chatsft.builtin import build_tokenizer

    texts = [m["content"] for m in DIALOGUE["messages"]] + ["user", "assistant", "\n", "Ċ"]
    return build_tokenizer(tmp_path_factory.mktemp("tok"), texts=texts * 3, vocab_size=5000)


def learned_text(tok, s):
    return tok.decode(s.input_ids[s.labels != IGNORE].tolist(), clean_up_tokenization_spaces=False)


def test_session_learns_every_answer_with_its_end(tok):
    (s,) = render_conversation(DIALOGUE, tok, "chatml", source="d.jsonl:1").samples
    assert learned_text(tok, s) == "one two three four five six seven<|im_end|>Yes<|im_end|>No<|im_end|>"
    assert s.source == "d.jsonl:1" and s.eot_supervised == 3 and not s.truncated
    assert len(s.labels) == len(s.input_ids)


def test_split_turn_one_sample_per_answer_with_history_as_context(tok):
    (session,) = render_conversation(DIALOGUE, tok, "chatml").samples
    samples = render_conversation(DIALOGUE, tok, "chatml", organization="split_turn", source="d.jsonl:1").samples
    assert [s.source for s in samples] == ["d.jsonl:1#turn=1", "d.jsonl:1#turn=2", "d.jsonl:1#turn=3"]
    assert [learned_text(tok, s) for s in samples] == [
        "one two three four five six seven<|im_end|>", "Yes<|im_end|>", "No<|im_end|>"]
    for s in samples:  # each sample is a prefix of the dialogue ending at its answer's end token
        n = len(s.input_ids)
        assert (s.input_ids == session.input_ids[:n]).all()
        assert tok.convert_ids_to_tokens(int(s.input_ids[-1])) == "<|im_end|>" and s.labels[-1] != IGNORE


def test_policies(tok):
    (last,) = render_conversation(DIALOGUE, tok, "chatml", train_on="last_assistant").samples
    assert learned_text(tok, last) == "No<|im_end|>"
    (every,) = render_conversation(DIALOGUE, tok, "chatml", train_on="all_tokens").samples
    assert (every.labels == every.input_ids).all()
    split_last = render_conversation(DIALOGUE, tok, "chatml", organization="split_turn",
                                     train_on="last_assistant").samples
    assert [s.source for s in split_last] == ["#turn=3"] and learned_text(tok, split_last[0]) == "No<|im_end|>"


def answer_end(tok, k):
    (s,) = render_conversation(DIALOGUE, tok, "chatml").samples
    ends = np.flatnonzero(s.input_ids == tok.convert_tokens_to_ids("<|im_end|>"))
    learned_ends = [int(e) + 1 for e in ends if s.labels[e] != IGNORE]
    return learned_ends[k]


def test_truncation_by_turns_never_cuts_an_answer(tok):
    limit = answer_end(tok, 1) + 3  # room for answer 2 but not answer 3
    (s,) = render_conversation(DIALOGUE, tok, "chatml", max_length=limit, truncation="turns").samples
    assert len(s) == answer_end(tok, 1) and s.truncated and s.answers_cut == 0
    assert learned_text(tok, s) == "one two three four five six seven<|im_end|>Yes<|im_end|>"
    assert s.eot_supervised == 2


def test_truncation_right_cuts_and_counts_the_cut_answer(tok):
    limit = answer_end(tok, 0) - 2  # inside the first answer
    (s,) = render_conversation(DIALOGUE, tok, "chatml", max_length=limit, truncation="right").samples
    assert len(s) == limit and s.truncated and s.answers_cut == 1 and s.eot_supervised == 0
    assert "<|im_end|>" not in learned_text(tok, s)


def test_truncation_drops_and_counts(tok):
    short = answer_end(tok, 0) - 1
    r = render_conversation(DIALOGUE, tok, "chatml", max_length=short, truncation="turns")
    assert r.samples == [] and r.dropped == {"no_supervision": 1}
    r = render_conversation(DIALOGUE, tok, "chatml", max_length=short, truncation="drop")
    assert r.samples == [] and r.dropped == {"too_long": 1}
    r = render_conversation(DIALOGUE, tok, "chatml", max_length=4, truncation="right")
    assert r.samples == [] and r.dropped == {"no_supervision": 1}
    # split_turn: only the samples that do not fit are dropped
    r = render_conversation(DIALOGUE, tok, "chatml", organization="split_turn",
                            max_length=answer_end(tok, 1), truncation="turns")
    assert len(r.samples) == 2 and r.dropped == {"no_supervision": 1}


def test_per_turn_loss_weights_come_from_the_masks(tok):
    # Answers of 7, 1 and 1 words: 8, 2 and 2 learned tokens with their end tokens.
    (session,) = render_conversation(DIALOGUE, tok, "chatml").samples
    split = render_conversation(DIALOGUE, tok, "chatml", organization="split_turn").samples
    assert turn_weights([session], "token") == {0: Fraction(2, 3), 1: Fraction(1, 6), 2: Fraction(1, 6)}
    assert turn_weights(split, "token") == {0: Fraction(2, 3), 1: Fraction(1, 6), 2: Fraction(1, 6)}
    assert turn_weights(split, "sample") == {0: Fraction(1, 3), 1: Fraction(1, 3), 2: Fraction(1, 3)}
    assert turn_weights([session], "sample") == turn_weights([session], "token")


def test_mask_stats_aggregate_and_merge(tok):
    a, b = MaskStats(), MaskStats()
    (s,) = render_conversation(DIALOGUE, tok, "chatml").samples
    a.records_read = 2
    a.add_sample(s)
    a.add_bad("invalid_json")
    b.records_read = 1
    b.add_dropped(render_conversation(DIALOGUE, tok, "chatml", max_length=3).dropped)
    d = a.merge(b).to_dict()
    assert d["records_read"] == 3 and d["records_bad"] == 1 and d["bad_by_reason"] == {"invalid_json": 1}
    assert d["samples"] == 1 and d["tokens"] == len(s) and d["supervised_tokens"] == s.num_supervised == 12
    assert d["supervision_ratio"] == pytest.approx(12 / len(s)) and d["dropped_no_supervision"] == 1
    assert MaskStats.from_dict(d).to_dict() == d


def test_seq2seq_history_to_encoder_answer_to_decoder(tiny_t5_dir):
    from transformers import AutoTokenizer

    t5 = AutoTokenizer.from_pretrained(tiny_t5_dir)
    conv = parse_record(DIALOGUE, "d.jsonl:1")
    opts = RenderOptions(organization="split_turn", max_length=None, max_target_length=None)
    r = render_seq2seq(conv, t5, opts)
    assert [s.source for s in r.samples] == ["d.jsonl:1#turn=1", "d.jsonl:1#turn=2", "d.jsonl:1#turn=3"]
    first, last = r.samples[0], r.samples[-1]
    assert t5.decode(first.input_ids) == "Tell me seven words<|endoftext|>"
    assert t5.decode(first.labels) == "one two three four five six seven<|endoftext|>"
    assert t5.decode(last.input_ids).startswith("User: Tell me seven words\nAssistant: one two")
    assert (last.labels != IGNORE).all()
    cut = render_seq2seq(conv, t5, RenderOptions(organization="split_turn", max_length=5, max_target_length=3))
    s = cut.samples[0]
    assert len(s.input_ids) == 5 and len(s.labels) == 3 and s.truncated and s.answers_cut == 1
    assert t5.decode(s.input_ids).endswith("<|endoftext|>")  # history cut from the left, the end kept
    with pytest.raises(TemplateError, match="data.organization"):
        render_seq2seq(conv, t5, RenderOptions())


def test_pad_token_is_not_the_end_token(tiny_llama_dir):
    from chatsft.config import load_config
    from chatsft.model import load_tokenizer

    tok = load_tokenizer(load_config(None, [f"model.name_or_path={tiny_llama_dir}"]).model)
    assert tok.pad_token_id is not None
    assert tok.pad_token_id not in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))


def test_previews_mark_what_is_learned(tok):
    (s,) = render_conversation(DIALOGUE, tok, "chatml", source="d.jsonl:1").samples
    plain = to_terminal(tok, s, color=False)
    assert "[[Yes<|im_end|>]]" in plain and "[[Again?" not in plain
    page = to_html(tok, [s])
    assert '<span class="sup">Yes&lt;|im_end|&gt;</span>' in page and "d.jsonl:1" in page


# --------------------------------------------------- token boundaries of the masks

def _tokenizer_kinds(folder):
    """Three ways real tokenizers map characters to tokens: byte-level BPE (GPT-2/Llama-3/Qwen),
    the same with offsets trimmed of spaces (a space then belongs to no token), and
    SentencePiece-style Metaspace (Llama-2, Mistral, T5: spaces become ▁)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from chatsft.builtin import EOS, PAD, TEMPLATE_TOKENS, UNK, build_tokenizer, sample_texts

    texts = sample_texts()[:300]
    byte_level = build_tokenizer(folder / "bl", texts=texts, vocab_size=800)
    trimmed = build_tokenizer(folder / "tr", texts=texts, vocab_size=800)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    raw = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=False))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=[PAD, EOS, UNK, *TEMPLATE_TOKENS],
                                                       show_progress=False))
    metaspace = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                        additional_special_tokens=list(TEMPLATE_TOKENS))
    return {"byte_level": byte_level, "trimmed_offsets": trimmed, "metaspace": metaspace}


@pytest.fixture(scope="module")
def tokenizer_kinds(tmp_path_factory):
    return _tokenizer_kinds(tmp_path_factory.mktemp("kinds"))


_WORDS = ["Hello", " there", " café", "😀", "  ", "\n", "问答", "x", " 42", "!", "\t"]


def test_mask_boundaries_from_the_char_map_equal_those_from_offsets(tokenizer_kinds, monkeypatch):
    """Masks locate answers through the encoding's char -> token map (fast); the offsets,
    searched whole, are the reference. They must agree for every kind of tokenizer."""
    import random

    from chatsft.data import render

    rng = random.Random(0)
    records = []
    for _ in range(150):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                text = "".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))
                msgs.append({"role": role, "content": text if text.strip() else "ok"})
        records.append(parse_record({"messages": msgs}))
    opts = RenderOptions(organization="split_turn")
    for kind, tok in tokenizer_kinds.items():
        for template in ("chatml", "llama3", "chatglm2", "special"):
            tpl = render.get_template(template, tok)
            fast = render.render_batch(records, tok, tpl, opts)
            with monkeypatch.context() as m:
                m.setattr(render, "_token_bounds", lambda enc, n, a, b: render._token_bounds_from_offsets(enc, a, b))
                reference = render.render_batch(records, tok, tpl, opts)
            for got, want in zip(fast, reference):
                assert [(s.source, s.labels.tolist()) for s in got.samples] == \
                       [(s.source, s.labels.tolist()) for s in want.samples], (kind, template)
            learned = sum(s.num_supervised for r in fast for s in r.samples)
            assert learned > 0, (kind, template)


def test_token_bounds_at_every_character_equal_a_search_of_the_offsets(tokenizer_kinds):
    """Every position, not only where templates put boundaries: inside multi-character tokens
    (a span edge that straddles a token), inside a character split into byte tokens, at the end."""
    import random

    from chatsft.data.render import _token_bounds, _token_bounds_from_offsets

    rng = random.Random(1)
    for kind, tok in tokenizer_kinds.items():
        for _ in range(100):
            text = "".join(rng.choice(_WORDS + ["<|im_end|>"]) for _ in range(8))
            enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
            starts, ends = list(range(len(text))), list(range(len(text) + 1))
            assert _token_bounds(enc, len(enc.ids), starts, ends) == \
                   _token_bounds_from_offsets(enc, starts, ends), (kind, text)


@pytest.mark.parametrize("template", ["chatml", "llama3", "chatglm2", "special"])
@pytest.mark.parametrize("organization", ["session", "split_turn"])
@pytest.mark.parametrize("truncation", ["turns", "right", "drop"])
def test_a_long_dialogue_encodes_only_the_prefix_it_keeps_with_the_same_samples(
        tiny_llama_dir, template, organization, truncation):
    """Truncation keeps the left part, so a dialogue far past max_length is encoded only up to a
    prefix cut before an added token: the samples equal those of the whole-string encode, also
    where CJK/emoji answers make several tokens per character (the prefix is then lengthened)."""
    from transformers import AutoTokenizer

    from chatsft.data.render import _encode, _samples, layout, render_batch
    from chatsft.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    msgs = []
    for i in range(300):
        answer = f"answer {i} 東京の天気は晴れ 🌤️" if i % 3 else f"plain answer number {i}"
        msgs += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": answer}]
    conv = parse_record({"messages": msgs}, "long.jsonl:1")
    tmpl = get_template(template, tok)
    for limit in (7, 200, 900):
        opts = RenderOptions(organization=organization, max_length=limit, truncation=truncation)
        lay = layout(conv, tmpl)
        (ids, enc), = _encode(tok, [lay.text])
        assert len(ids) > 4 * limit  # the bounded path is taken
        whole = _samples(conv.source, lay, ids, enc, opts)
        (bounded,) = render_batch([conv], tok, tmpl, opts)
        assert bounded.dropped == whole.dropped
        assert len(bounded.samples) == len(whole.samples)
        for a, b in zip(bounded.samples, whole.samples):
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
            assert (a.source, a.truncated, a.answers_cut, a.eot_supervised) == \
                   (b.source, b.truncated, b.answers_cut, b.eot_supervised)
