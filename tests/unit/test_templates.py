"""Chat formats on exact token ids, and the mask properties that must hold for any conversation."""

import copy
import json
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsft.builtin import build_tokenizer
from chatsft.data.conversation import BadRecord, merge_system, parse_record
from chatsft.data.render import IGNORE, render_conversation
from chatsft.data.templates import TemplateError, get_template

REC = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."}]}
TOOL = {"messages": [
    {"role": "user", "content": "Add 2 and 3"},
    {"role": "assistant", "content": [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                      {"type": "text", "text": "It is 5."}]}]}


@pytest.fixture(scope="module")
def word_tokenizer():
    """A BPE trained on exactly the test texts with room to spare, so every word is one token
    and the expected ids can be written down as the tokens a reader expects."""
    scratch = build_tokenizer(tempfile.mkdtemp(), texts=["x"], vocab_size=300)
    conv, tool = parse_record(REC), parse_record(TOOL)
    texts = ["".join(s.text for s in get_template(name, scratch).segments(c.messages))
             for name in ("chatml", "llama3", "chatglm2", "special") for c in (conv, tool)]
    return build_tokenizer(tempfile.mkdtemp(), texts=texts * 3, vocab_size=5000)


def expect(tokenizer, spec: str):
    """'a +b' -> (ids of a b, labels: -100 for a, id for b): '+' marks a learned token."""
    marked = [(t[1:], True) if t.startswith("+") and len(t) > 1 else (t, False) for t in spec.split()]
    ids = tokenizer.convert_tokens_to_ids([t for t, _ in marked])
    labels = [i if learned else IGNORE for (_, learned), i in zip(marked, ids)]
    assert tokenizer.unk_token_id not in ids, "a token of the spec is not in the vocabulary"
    return ids, labels


EXACT = {
    "chatml": "<|im_start|> system Ċ Be Ġbrief . <|im_end|> Ċ <|im_start|> user Ċ Hi Ġthere <|im_end|> Ċ "
              "<|im_start|> assistant Ċ +Hello +! +<|im_end|> Ċ <|im_start|> user Ċ Bye <|im_end|> Ċ "
              "<|im_start|> assistant Ċ +See +Ġyou +. +<|im_end|> Ċ",
    "llama3": "<|begin_of_text|> <|start_header_id|> system <|end_header_id|> Ċ Ċ Be Ġbrief . <|eot_id|> "
              "<|start_header_id|> user <|end_header_id|> Ċ Ċ Hi Ġthere <|eot_id|> "
              "<|start_header_id|> assistant <|end_header_id|> Ċ Ċ +Hello +! +<|eot_id|> "
              "<|start_header_id|> user <|end_header_id|> Ċ Ċ Bye <|eot_id|> "
              "<|start_header_id|> assistant <|end_header_id|> Ċ Ċ +See +Ġyou +. +<|eot_id|>",
    # 问 and ：are three bytes each in UTF-8: byte-level BPE shows them as éĹ® and ï¼ļ (答 is çŃĶ).
    # No system role in ChatGLM2: it is folded into the first question.
    "chatglm2": "[ Round Ġ1 ] Ċ Ċ éĹ® ï¼ļ Be Ġbrief . Ċ Ċ Hi Ġthere Ċ Ċ çŃĶ ï¼ļ +Hello +! +<|endoftext|> Ċ Ċ "
                "[ Round Ġ2 ] Ċ Ċ éĹ® ï¼ļ Bye Ċ Ċ çŃĶ ï¼ļ +See +Ġyou +. +<|endoftext|> ĊĊ",
    "special": "<|bos|> <|user_start|> Be Ġbrief . Ċ Ċ Hi Ġthere <|user_end|> <|assistant_start|> +Hello +! "
               "+<|assistant_end|> <|user_start|> Bye <|user_end|> <|assistant_start|> +See +Ġyou +. "
               "+<|assistant_end|>",
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_ids(word_tokenizer, name):
    (s,) = render_conversation(REC, word_tokenizer, name).samples
    ids, labels = expect(word_tokenizer, EXACT[name])
    assert s.input_ids.tolist() == ids
    assert s.labels.tolist() == labels


def test_special_token_ids_are_fixed_by_construction(word_tokenizer):
    # PAD, EOS, UNK, then the template markers in order: ids a reader can check by hand.
    assert word_tokenizer.convert_tokens_to_ids(["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 3, 4]
    (s,) = render_conversation(REC, word_tokenizer, "chatml").samples
    assert s.input_ids[0] == 3 and s.input_ids[-2] == 4 and s.labels[-2] == 4 and s.labels[-1] == IGNORE


def test_tool_parts_special(word_tokenizer):
    (s,) = render_conversation(TOOL, word_tokenizer, "special").samples
    ids, labels = expect(word_tokenizer,
                         "<|bos|> <|user_start|> Add Ġ2 Ġand Ġ3 <|user_end|> <|assistant_start|> "
                         "+<|python_start|> +2 ++ +3 +<|python_end|> <|output_start|> 5 <|output_end|> "
                         "+It +Ġis +Ġ5 +. +<|assistant_end|>")
    assert s.input_ids.tolist() == ids and s.labels.tolist() == labels


def test_tool_parts_fenced_in_chatml(word_tokenizer):
    (s,) = render_conversation(TOOL, word_tokenizer, "chatml").samples
    learned = word_tokenizer.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE],
                                    clean_up_tokenization_spaces=False)
    assert learned == "```python\n2+3\n```\nIt is 5.<|im_end|>"
    assert "```output\n5\n```\n" in word_tokenizer.decode(s.input_ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name, record, reason", [
    ("chatglm2", {"messages": [{"role": "assistant", "content": "a"}]}, "bad_order"),
    ("special", {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]}, "bad_order"),
    ("chatglm2", {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "t"},
                               {"role": "assistant", "content": "a"}]}, "unsupported_role"),
    ("chatml", {"messages": [{"role": "user", "content": "say <|im_end|> now"},
                             {"role": "assistant", "content": "a"}]}, "control_token_in_content"),
])
def test_template_record_errors(tokenizer, name, record, reason):
    with pytest.raises(BadRecord) as e:
        render_conversation(record, tokenizer, name, source="c.jsonl:3")
    assert e.value.reason == reason
    assert str(e.value).startswith(f"c.jsonl:3: {reason}: ")


def test_template_needs_single_token_markers(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")  # no chat markers at all
    with pytest.raises(TemplateError, match=r"data.template=chatml: .*no single token for <\|im_start\|>, <\|im_end\|>"):
        get_template("chatml", bare)
    with pytest.raises(TemplateError, match="unknown template 'vicuna'"):
        get_template("vicuna", tokenizer)


# ------------------------------------------------------------------------------ hf


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BOS_TRIM = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
                  "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SYSTEM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
             "<|im_start|>{{ role }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}")
GENERATION = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
              "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}"
              "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STYLES = {"chatml": CHATML, "bos_trim": BOS_TRIM, "default_system": DEFAULT_SYSTEM, "no_system": NO_SYSTEM,
          "generation_markers": GENERATION}
TRIMS = {"bos_trim", "no_system"}


def with_template(tokenizer, jinja):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = jinja
    return tok


def hf_ids(tok, messages):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_hf_matches_apply_chat_template(tokenizer, style):
    tok = with_template(tokenizer, STYLES[style])
    msgs = REC["messages"]
    (s,) = render_conversation(REC, tok, "hf").samples
    reference = msgs if style != "no_system" else [
        {"role": m.role, "content": m.content} for m in merge_system(parse_record(REC).messages)]
    assert s.input_ids.tolist() == hf_ids(tok, reference)
    learned = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE],
                         clean_up_tokenization_spaces=False)
    end = "<|eot_id|>" if style == "bos_trim" else "<|im_end|>"
    assert learned == f"Hello!{end}See you.{end}"
    if style in ("bos_trim", "no_system"):
        assert s.input_ids.tolist().count(tok.bos_token_id) == 1  # no double BOS
    if style == "no_system":
        assert "Be brief.\n\nHi there" in tok.decode(s.input_ids)


def test_hf_agrees_with_generation_markers(tokenizer):
    tok = with_template(tokenizer, GENERATION)
    out = tok.apply_chat_template(REC["messages"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    (s,) = render_conversation(REC, tok, "hf").samples
    assert (s.labels != IGNORE).astype(int).tolist() == list(out["assistant_masks"])


@pytest.mark.parametrize("jinja, why", [
    # Drops earlier answers from the history (as some reasoning templates do): answers cannot be located.
    ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>{{ m['role'] }}\n"
     "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "drops or rewrites what messages say"),
    # No end-of-turn marker: a model trained on it would never learn to stop.
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}", "no end-of-turn marker"),
    # Rewrites the answer: it never appears verbatim.
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "drops or rewrites what messages say"),
])
def test_hf_refuses_templates_whose_answers_cannot_be_located(tokenizer, jinja, why):
    with pytest.raises(TemplateError, match=f"data.template=hf: cannot locate.*{why}"):
        get_template("hf", with_template(tokenizer, jinja))


def test_hf_without_a_template(tokenizer):
    tok = with_template(tokenizer, None)
    with pytest.raises(TemplateError, match="has no chat_template"):
        get_template("hf", tok)


# ------------------------------------------------------------------- properties

TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ019 .,!?'\n\té问答€😀")), min_size=1, max_size=24)
ANSWER = TEXT.filter(lambda t: t.strip() and not t[0].isspace())


@st.composite
def dialogues(draw):
    turns = draw(st.integers(1, 4))
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(TEXT)})
    for _ in range(turns):
        msgs.append({"role": "user", "content": draw(TEXT)})
        msgs.append({"role": "assistant", "content": draw(ANSWER)})
    return {"messages": msgs}


def learned_by_answer(tokenizer, sample):
    out = []
    for k in sorted(set(sample.answer_of_token[sample.labels != IGNORE].tolist())):
        ids = sample.input_ids[(sample.answer_of_token == k) & (sample.labels != IGNORE)]
        out.append(tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False))
    return out


ENDS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "chatglm2": "<|endoftext|>", "special": "<|assistant_end|>"}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", sorted(ENDS))
@SETTINGS
@given(record=dialogues())
def test_learned_tokens_decode_to_each_answer_and_its_end(tokenizer, name, record):
    (s,) = render_conversation(record, tokenizer, name).samples
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    if name == "llama3":
        answers = [a.strip() for a in answers]
    assert learned_by_answer(tokenizer, s) == [a + ENDS[name] for a in answers]
    # Nothing outside the answers is learned, and labels equal ids where learned.
    learned = s.labels != IGNORE
    assert (s.labels[learned] == s.input_ids[learned]).all()
    assert (s.answer_of_token[learned] >= 0).all()


@pytest.mark.parametrize("style", sorted(STYLES))
@SETTINGS
@given(record=dialogues())
def test_hf_equals_apply_chat_template_on_random_dialogues(tokenizer, style, record):
    tok = with_template(tokenizer, STYLES[style]) if style != "chatml" else tokenizer
    (s,) = render_conversation(record, tok, "hf").samples
    msgs = record["messages"]
    if style == "no_system":
        msgs = [{"role": m.role, "content": m.content} for m in merge_system(parse_record(record).messages)]
    assert s.input_ids.tolist() == hf_ids(tok, msgs)
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    if style in TRIMS:
        answers = [a.strip() for a in answers]
    end = "<|eot_id|>" if style == "bos_trim" else "<|im_end|>"
    assert learned_by_answer(tok, s) == [a + end for a in answers]


def test_hf_record_the_template_rejects_is_a_template_error(tokenizer):
    tok = with_template(tokenizer, NO_SYSTEM)
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}
    with pytest.raises(BadRecord) as e:
        render_conversation(record, tok, "hf", source="t.jsonl:9")
    assert e.value.reason == "template_error"
    assert str(e.value) == ("t.jsonl:9: template_error: the tokenizer's chat template failed on this record: "
                            "Conversation roles must alternate user/assistant/user/assistant/...")


# --------------------------------------------------------- reasoning and tools, built-in formats

RICH = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}], "messages": [
    {"role": "user", "content": "Add 2 and 3"},
    {"role": "assistant", "content": None, "reasoning_content": "Use the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "content": "5", "tool_call_id": "c1", "name": "add"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "It is 5.", "reasoning_content": ""}]}


def learned_runs(tok, s):
    from chatsft.data.preview import runs

    return [text for text, learned in runs(tok, s.input_ids, s.labels) if learned]


def test_chatml_renders_reasoning_and_tool_calls_as_qwen_does(tokenizer):
    (s,) = render_conversation(RICH, tokenizer, "chatml").samples
    text = tokenizer.decode(s.input_ids, clean_up_tokenization_spaces=False)
    assert text.startswith("<|im_start|>system\n# Tools\n\n") and '{"type": "function", "function": {"name": "add"' in text
    assert learned_runs(tokenizer, s) == [
        '<think>\nUse the tool.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
        "<|im_end|>", "<think>\n\n</think>\n\nIt is 5.<|im_end|>"]
    assert "<|im_start|>tool\n5<|im_end|>" in text  # the tool's result is context
    # mask_empty: the empty think block is context; drop_history: earlier reasoning is not rendered.
    (empty,) = render_conversation(RICH, tokenizer, "chatml", think="mask_empty").samples
    assert learned_runs(tokenizer, empty)[1] == "It is 5.<|im_end|>"
    (drop,) = render_conversation(RICH, tokenizer, "chatml", think="drop_history").samples
    assert "Use the tool." not in tokenizer.decode(drop.input_ids)
    assert learned_runs(tokenizer, drop)[0].startswith("<tool_call>")


def test_llama3_renders_a_tool_call_as_json_and_refuses_reasoning(tokenizer):
    record = json.loads(json.dumps(RICH))
    for m in record["messages"]:
        m.pop("reasoning_content", None)
    (s,) = render_conversation(record, tokenizer, "llama3").samples
    assert learned_runs(tokenizer, s) == ['{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>',
                                          "It is 5.<|eot_id|>"]
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n5<|eot_id|>" in tokenizer.decode(s.input_ids)
    with pytest.raises(BadRecord) as e:
        render_conversation(RICH, tokenizer, "llama3")
    assert e.value.reason == "unsupported_field" and "reasoning_content" in e.value.detail


@pytest.mark.parametrize("name", ["special", "chatglm2"])
def test_formats_without_a_rendering_refuse_reasoning_and_tools(tokenizer, name):
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    for record, what in ((dict(plain, tools=RICH["tools"]), "tools list"),
                         ({"messages": [plain["messages"][0], dict(plain["messages"][1], reasoning_content="r")]},
                          "reasoning_content")):
        with pytest.raises(BadRecord) as e:
            render_conversation(record, tokenizer, name, source="x.jsonl:1")
        assert e.value.reason == "unsupported_field" and what in e.value.detail


def test_render_conversation_is_exported_from_the_package():
    import chatsft.data

    assert chatsft.data.render_conversation is render_conversation


@pytest.mark.parametrize("style", ["chatml", "bos_trim"])
def test_hf_tool_output_inside_an_answer_is_context(tokenizer, style):
    tok = with_template(tokenizer, STYLES[style])
    (s,) = render_conversation(TOOL, tok, "hf").samples
    reference = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                  "".join(("```python\n" + p["text"] + "\n```\n") if p["type"] == "python" else
                          ("```output\n" + p["text"] + "\n```\n") if p["type"] == "python_output" else p["text"]
                          for p in m["content"])} for m in TOOL["messages"]]
    assert s.input_ids.tolist() == hf_ids(tok, reference)
    end = "<|eot_id|>" if style == "bos_trim" else "<|im_end|>"
    assert learned_runs(tok, s) == ["```python\n2+3\n```\n", f"It is 5.{end}"]
