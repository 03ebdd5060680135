"""data.template=hf on templates in the style of the families people fine-tune (chat_families.py).

The rule: input_ids are exactly apply_chat_template of the whole record; learned is, for each answer,
what the model emits after the prompt of that turn: from the end of the assistant header through the
stop. Each test below writes the whole render with the learned runs in «», so the ids, the mask and
its position are stated at once; `marked` decodes the real token runs, so a token that straddles a
boundary shows.
"""

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_families import FAMILIES, SMOL, build
from chatsft.data import render_conversation
from chatsft.data.conversation import BadRecord, parse_record
from chatsft.data.preview import runs
from chatsft.data.render import IGNORE
from chatsft.data.template_report import format_report, template_report
from chatsft.data.templates import get_template

REC = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."}]}
TOOLS = [{"type": "function", "function": {"name": "route", "description": "Distance to a place.",
                                            "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "route", "arguments": {"to": "station"}}}
TOOL_REC = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "How far is it?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "2 km", "tool_call_id": "c1", "name": "route"},
    {"role": "assistant", "content": "It is 2 km."}]}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def with_reasoning(record, *reasonings):
    out = json.loads(json.dumps(record))
    answers = [m for m in out["messages"] if m["role"] == "assistant"]
    for m, r in zip(answers, reasonings):
        if r is not None:
            m["reasoning_content"] = r
    return out


def with_call_ids(messages):
    """The messages with every call that has no id given one as Kimi K2 names them: functions.NAME:IDX, IDX
    counting the record's calls from 0 (what chatsft hands a template that names calls by id)."""
    out, n = json.loads(json.dumps(messages)), 0
    for m in out:
        for call in m.get("tool_calls") or []:
            call.setdefault("id", f"functions.{call['function']['name']}:{n}")
            n += 1
    return out


def reference(tok, record, folded=False, ids=False, **kwargs):
    """What apply_chat_template gives for the record (its system folded where the template refuses one;
    calls given ids where the template names calls by id; `kwargs`: the template's variables)."""
    msgs = record["messages"]
    if folded:
        msgs = parse_record(json.loads(json.dumps(record)))
        from chatsft.data.conversation import merge_system

        msgs = [{"role": m.role, "content": m.content} for m in merge_system(msgs.messages)]
    if ids:
        msgs = with_call_ids(msgs)
    return list(tok.apply_chat_template(msgs, tools=record.get("tools"), tokenize=True, return_dict=False, **kwargs))


def marked(tok, s):
    return "".join(f"«{text}»" if learned else text for text, learned in runs(tok, s.input_ids, s.labels))


def rendered(tok, record, think=None, folded=False, ids=False, **kwargs):
    (s,) = render_conversation(record, tok, "hf", think=think, chat_template_kwargs=kwargs).samples
    assert s.input_ids.tolist() == reference(tok, record, folded, ids, **kwargs)
    learned = s.labels != IGNORE
    assert (s.labels[learned] == s.input_ids[learned]).all() and (s.answer_of_token[learned] >= 0).all()
    return s


def learned_tokens(tok, s):
    return tok.convert_ids_to_tokens(s.input_ids[s.labels != IGNORE].tolist())


# ------------------------------------------------------------------ (a) to (j)


def test_a_qwen3_history_answers_lose_their_reasoning_the_final_one_learns_its_think_block(family):
    tok = family("qwen3")
    t = get_template("hf", tok)
    assert t.think == "drop_history" and t.info["reasoning_rendered"] == "final"
    s = rendered(tok, with_reasoning(REC, "Greet back.", "Say goodbye."))
    assert marked(tok, s) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n«Hello!<|im_end|>»\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n«<think>\nSay goodbye.\n</think>\n\nSee you.<|im_end|>»\n")
    # Reasoning written inline in the content, as DeepSeek-R1 data has it: the template splits it off.
    inline = json.loads(json.dumps(REC))
    inline["messages"][4]["content"] = "<think>\nSay goodbye.\n</think>\n\nSee you."
    assert rendered(tok, inline).input_ids.tolist() == s.input_ids.tolist()
    # No reasoning: the final answer gets an empty think block. The model writes it (learned) unless
    # mask_empty makes it context.
    plain = rendered(tok, REC)
    assert marked(tok, plain).endswith("<|im_start|>assistant\n«<think>\n\n</think>\n\nSee you.<|im_end|>»\n")
    assert marked(tok, rendered(tok, REC, think="mask_empty")).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n«See you.<|im_end|>»\n")


def test_a_qwen3_final_reasoning_the_template_drops_is_refused(family):
    # A template that never renders reasoning (DeepSeek-R1-distill style strips it from every answer):
    # a final answer's reasoning would silently vanish, so the record is refused.
    tok = family("phi3")
    with pytest.raises(BadRecord) as e:
        render_conversation(with_reasoning(REC, None, "Say goodbye."), tok, "hf", source="r.jsonl:4")
    assert e.value.reason == "reasoning_not_rendered" and str(e.value).startswith("r.jsonl:4: reasoning_not_rendered")


def test_b_mistral_system_in_the_last_user_turn_is_left_where_the_template_puts_it(family):
    tok = family("mistral")
    assert get_template("hf", tok).info["system"] == "moved by the template into a later turn"
    s = rendered(tok, REC)
    assert marked(tok, s) == ("<s>[INST] Hi there[/INST]« Hello!</s>»[INST] Be brief.\n\nBye[/INST]« See you.</s>»")


def test_c_phi3_eos_after_the_last_message_is_not_learned(family):
    tok = family("phi3")
    t = get_template("hf", tok)
    assert t.info["stops"] == ["<|end|>"] and t.end_of_turn == "<|end|>"
    s = rendered(tok, REC)
    assert marked(tok, s) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n«Hello!<|end|>»\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\n«See you.<|end|>»\n<|endoftext|>")


def test_d_glm_learns_the_next_role_tag_as_its_stop_and_not_earlier_empty_think_blocks(family):
    tok = family("glm")
    t = get_template("hf", tok)
    assert t.info["stop_kind"].startswith("next role tag") and t.think == "drop_history"
    assert set(t.info["stops"]) >= {"<|user|>", "<|observation|>"}
    s = rendered(tok, REC)
    # The final answer has no stop: the template writes nothing after the last message.
    assert marked(tok, s) == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\n<think></think>\n«Hello!<|user|>»\n"
        "Bye<|assistant|>«\n<think></think>\nSee you.»")
    assert marked(tok, rendered(tok, REC, think="mask_empty")).endswith(
        "Bye<|assistant|>\n<think></think>\n«See you.»")
    assert marked(tok, rendered(tok, REC, think="learn")).startswith(
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>«\n<think></think>\nHello!<|user|>»")
    tools = rendered(tok, TOOL_REC)
    assert marked(tok, tools).endswith(
        "How far is it?<|assistant|>«\n<think></think>\n<tool_call>route\n<arg_key>to</arg_key>\n"
        "<arg_value>station</arg_value>\n</tool_call><|observation|>»\n<tool_response>\n2 km\n</tool_response>"
        "<|assistant|>«\n<think></think>\nIt is 2 km.»")


def test_e_llama31_dated_system_header_is_context_and_a_tool_call_is_learned(family):
    tok = family("llama31")
    no_system = {"messages": REC["messages"][1:]}
    s = rendered(tok, no_system)
    assert marked(tok, s) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n«Hello!<|eot_id|>»<|start_header_id|>user<|end_header_id|>"
        "\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n«See you.<|eot_id|>»")
    tools = rendered(tok, TOOL_REC)
    assert marked(tok, tools).endswith(
        "How far is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        '«{"name": "route", "parameters": {"to": "station"}}<|eot_id|>»'
        "<|start_header_id|>ipython<|end_header_id|>\n\n2 km<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n«It is 2 km.<|eot_id|>»")
    # The template writes a tool call in place of the answer's text: that text cannot be learned.
    said = json.loads(json.dumps(TOOL_REC))
    said["messages"][1]["content"] = "Let me look."
    with pytest.raises(BadRecord) as e:
        render_conversation(said, tok, "hf", source="t.jsonl:2")
    assert e.value.reason == "answer_not_in_render" and "'Let me look.'" in e.value.detail


def test_f_gemma4_generation_prompt_opens_a_channel_the_history_lacks(family):
    tok = family("gemma4")
    t = get_template("hf", tok)
    assert t.info["generation_prompt_extra"] == "<|channel>thought\n<channel|>"
    assert t.think == "mask_empty"  # thinking is off at inference: an empty channel is prompt
    s = rendered(tok, with_reasoning(REC, "Greet back.", "Say goodbye."))
    assert marked(tok, s) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n<|turn>model\n«Hello!<turn|>»\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n«<|channel>thought\nSay goodbye.<channel|>See you.<turn|>»\n")


def test_g_a_separator_after_the_header_is_learned_even_as_a_token_of_its_own(family):
    tok = family("mistral")
    for answer, tokens in (("42 is the answer.", ["Ġ", "4", "2", "Ġis", "Ġthe", "Ġanswer", ".", "</s>"]),
                           ("你好", ["Ġ", "ä", "½", "ł", "å", "¥", "½", "</s>"])):
        record = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": answer}]}
        s = rendered(tok, record)
        # `[/INST]`, then " " as a token of its own (this BPE never merged a space with a digit or a CJK
        # byte): the model must write it, so it is learned.
        assert tok.convert_ids_to_tokens(s.input_ids.tolist())[:7] == ["<s>", "[INST]", "Ġ", "H", "i", "Ġthere",
                                                                       "[/INST]"]
        assert learned_tokens(tok, s) == tokens
        assert marked(tok, s) == f"<s>[INST] Hi there[/INST]« {answer}</s>»"


def test_h_a_template_that_trims_learns_the_trimmed_answer(family):
    tok = family("llama31")
    record = {"messages": [{"role": "user", "content": "  Hi there \n"},
                           {"role": "assistant", "content": "\n  Hello!  \n"}]}
    s = rendered(tok, record)
    assert marked(tok, s).endswith("\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                                   "«Hello!<|eot_id|>»")


def test_i_gemma2_raises_on_a_system_message_so_it_is_folded_and_reported(family):
    tok = family("gemma2")
    t = get_template("hf", tok)
    assert t.info["system"].startswith("folded into the first user turn")
    s = rendered(tok, REC, folded=True)
    assert marked(tok, s) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n«Hello!<end_of_turn>»\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n«See you.<end_of_turn>»\n")
    # Without a system message nothing is folded: the record is the template's as given.
    assert rendered(tok, {"messages": REC["messages"][1:]}).input_ids.tolist() == reference(
        tok, {"messages": REC["messages"][1:]})
    report = template_report(t, tok, [parse_record(REC, "g.jsonl:1")])
    assert report["notes"] == {"system folded into the first user turn": 1}
    # What the template itself refuses stays a refusal, with the template's words.
    with pytest.raises(BadRecord) as e:
        render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                          {"role": "assistant", "content": "c"}]}, tok, "hf")
    assert e.value.reason == "template_error" and "alternate" in e.value.detail


def test_j_generation_markers_are_used_and_agree_with_the_rule(family):
    tok = family("smol")
    t = get_template("hf", tok)
    assert t.info["strategy"] == "markers"
    record = with_reasoning(REC, "Greet back.", None)
    s = rendered(tok, record)
    mask = tok.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)["assistant_masks"]
    assert (s.labels != IGNORE).astype(int).tolist() == list(mask)
    assert marked(tok, s) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n«<think>\nGreet back.\n</think>\nHello!<|im_end|>»\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n«See you.<|im_end|>»\n")


def test_f_gemma4_results_go_into_the_model_turn_and_the_next_answer_goes_on_in_it(family):
    # Gemma 4 writes a call's results into the model's own turn, then the next answer with no header;
    # the model's stop after its calls is `<|tool_response>`. Before, one failing probe refused the whole
    # template ("no assistant header after the previous message").
    tok = family("gemma4")
    t = get_template("hf", tok)
    assert t.info["stops"] == ["<turn|>", "<|tool_response>"] and t.info["call_stop"] == "<|tool_response>"
    assert all(f["supported"] for f in t.info["features"].values())
    record = with_reasoning(TOOL_REC, "Look it up.")
    s = rendered(tok, record)
    tools_turn = ('<bos><|turn>system\n<|tool>declaration:route{description:<|"|>Distance to a place.<|"|>}<tool|>'
                  "<turn|>\n<|turn>user\nHow far is it?<turn|>\n<|turn>model\n")
    assert marked(tok, s) == (
        tools_turn + '«<|channel>thought\nLook it up.<channel|><|tool_call>call:route{to:<|"|>station<|"|>}'
        '<tool_call|><|tool_response>»response:route{value:<|"|>2 km<|"|>}<tool_response|>«It is 2 km.<turn|>»\n')
    learned = learned_tokens(tok, s)
    assert learned[learned.index("<tool_call|>") + 1] == "<|tool_response>" and learned[-1] == "<turn|>"
    # Thinking on (enable_thinking): a system turn opens with <|think|>, the generation prompt adds nothing,
    # and the default policy learns only the final exchange's thought channels.
    on = get_template("hf", tok, None, {"enable_thinking": True})
    assert on.info["generation_prompt_extra"] == "" and on.think == "drop_history"
    s = rendered(tok, record, enable_thinking=True)
    assert marked(tok, s).startswith("<bos><|turn>system\n<|think|>\n<|tool>declaration:route")
    assert marked(tok, s).endswith("<|turn>model\n«<|channel>thought\nLook it up.<channel|><|tool_call>call:route"
                                   '{to:<|"|>station<|"|>}<tool_call|><|tool_response>»response:route{value:<|"|>'
                                   '2 km<|"|>}<tool_response|>«It is 2 km.<turn|>»\n')


def test_f_gemma4_answer_after_a_result_is_placed_when_its_prompt_keeps_reasoning_the_whole_drops(family):
    # A question after the tool exchange makes the template drop the call's thought channel from the whole
    # record, while the prompt of the answer after the result keeps it: the answer starts after the
    # result's closing marker, and the report says the context differs from the one served.
    tok = family("gemma4")
    record = with_reasoning(TOOL_REC, "Look it up.")
    record["messages"] += [{"role": "user", "content": "And back?"}, {"role": "assistant", "content": "Also 2 km."}]
    s = rendered(tok, record, enable_thinking=True)
    assert marked(tok, s).endswith(
        '<|turn>model\n«<|tool_call>call:route{to:<|"|>station<|"|>}<tool_call|><|tool_response>»response:route'
        '{value:<|"|>2 km<|"|>}<tool_response|>«It is 2 km.<turn|>»\n<|turn>user\nAnd back?<turn|>\n'
        "<|turn>model\n«Also 2 km.<turn|>»\n")
    t = get_template("hf", tok, None, {"enable_thinking": True})
    r = template_report(t, tok, [parse_record(record, "g.jsonl:1")])
    assert r["notes"]["answers placed after the tool result they follow (no header before them)"] == 1
    assert r["serving_parity"]["answers"] == 3 and r["serving_parity"]["same"] == 2
    assert r["serving_parity"]["differ"] == {
        "the record's render drops earlier reasoning that the prompt at inference holds": 1}


def test_kimi_calls_are_named_by_id_and_calls_without_one_get_functions_name_idx(family):
    tok = family("kimi")
    t = get_template("hf", tok)
    assert t.info["features"]["tool_calls"] == {
        "supported": True, "how": "named by their id (calls without one get functions.NAME:IDX), arguments given "
                                  "as an object"}
    second = {"type": "function", "function": {"name": "route", "arguments": '{"to": "home"}'}}
    own = {"type": "function", "id": "call_x7", "function": {"name": "log", "arguments": {}}}
    record = json.loads(json.dumps(TOOL_REC))
    record["messages"][3:3] = [{"role": "assistant", "content": "And home?", "tool_calls": [second, own]},
                               {"role": "tool", "content": "5 km", "tool_call_id": "functions.route:1"},
                               {"role": "tool", "content": "ok", "tool_call_id": "call_x7"}]
    s = rendered(tok, record, ids=True)
    assert marked(tok, s) == (
        '<|im_system|>tool_declare<|im_middle|>[{"type": "function", "function": {"name": "route", "description": '
        '"Distance to a place.", "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}]'
        "<|im_end|><|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
        "<|im_user|>user<|im_middle|>How far is it?<|im_end|><|im_assistant|>assistant<|im_middle|>"
        "«<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.route:0"
        '<|tool_call_argument_begin|>{"to": "station"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>»'
        "<|im_system|>tool<|im_middle|>## Return of c1\n2 km<|im_end|><|im_assistant|>assistant<|im_middle|>"
        "«<think></think>And home?<|tool_calls_section_begin|><|tool_call_begin|>functions.route:1"
        '<|tool_call_argument_begin|>{"to": "home"}<|tool_call_end|><|tool_call_begin|>call_x7'
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>»"
        "<|im_system|>tool<|im_middle|>## Return of functions.route:1\n5 km<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of call_x7\nok<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>«<think></think>It is 2 km.<|im_end|>»")
    r = template_report(t, tok, [parse_record(record, "k.jsonl:1")])
    assert r["notes"]["tool calls given an id functions.NAME:IDX (the record had none)"] == 2
    assert f"  {'tool calls':<20}supported: named by their id" in format_report(r)


def test_kimi_thinking_off_closes_an_empty_think_block_the_history_holds_too(family):
    # With thinking=false the generation prompt ends in `<think></think>`, which the history writes too:
    # that block is context, as at inference, and every answer's context is what is served.
    tok = family("kimi")
    t = get_template("hf", tok, None, {"thinking": False})
    assert t.info["generation_prompt_extra"] == "<think></think>" and t.think == "mask_empty"
    s = rendered(tok, REC, thinking=False)
    assert marked(tok, s).endswith("<|im_assistant|>assistant<|im_middle|><think></think>«Hello!<|im_end|>»"
                                   "<|im_user|>user<|im_middle|>Bye<|im_end|><|im_assistant|>assistant<|im_middle|>"
                                   "<think></think>«See you.<|im_end|>»")
    r = template_report(t, tok, [parse_record(REC, "k.jsonl:1"), parse_record(TOOL_REC, "k.jsonl:2")])
    assert r["serving_parity"] | {"examples": {}} == {
        "reference": "apply_chat_template(history, add_generation_prompt=True)", "answers": 4, "same": 4,
        "share": 1.0, "differ": {}, "examples": {}}


def test_gemma4_echo_refuses_tool_results_alone_and_renders_the_rest_exactly(family):
    # The variant writes what a tool returned into the next model turn, after its header: learning that answer
    # would teach the model to write the tool's output. Tool results are off; plain dialogues and calls are not.
    tok = family("gemma4_echo")
    t = get_template("hf", tok)
    f = t.info["features"]
    assert f["tool_calls"]["supported"] and f["reasoning"]["supported"] and not f["tool_results"]["supported"]
    assert f["tool_results"]["how"].startswith("the template writes what a tool returned where the next answer is "
                                               "learned (after its header)")
    s = rendered(tok, REC)
    assert marked(tok, s) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n<|turn>model\n«Hello!<turn|>»\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n«See you.<turn|>»\n")
    calls_only = {"tools": TOOLS, "messages": TOOL_REC["messages"][:2]}
    assert marked(tok, rendered(tok, calls_only)).endswith(
        '<|turn>model\n«<|tool_call>call:route{to:<|"|>station<|"|>}<tool_call|><turn|>»\n')
    with pytest.raises(BadRecord) as e:
        render_conversation(TOOL_REC, tok, "hf", source="e.jsonl:5")
    assert e.value.reason == "tool_results_unsupported"
    assert str(e.value) == ("e.jsonl:5: tool_results_unsupported: the chat template cannot render tool results as "
                            "context (chatsft template says why): messages[2] is a tool result, and the template "
                            "writes what a tool returned where the next answer is learned (after its header): it "
                            "would be learned as the model's words")


RAISES_ON = {  # a template that cannot take one feature, and the record that uses it
    "tool_calls": ("{%- if m.tool_calls -%}{{- raise_exception('tool calls are not supported') -}}{%- endif -%}",
                   TOOL_REC, 1, "calls a tool, and the template fails on a tool call (tool calls are not supported)"),
    "reasoning": ("{%- if m.reasoning_content -%}{{- raise_exception('no thinking here') -}}{%- endif -%}",
                  with_reasoning(REC, None, "Say goodbye."), 4,
                  "carries reasoning_content, and the template fails on an answer with reasoning_content "
                  "(no thinking here)"),
}


@pytest.mark.parametrize("feature", sorted(RAISES_ON))
def test_a_failing_probe_turns_off_its_feature_alone(family, feature):
    tok = family("qwen3")
    guard, record, index, why = RAISES_ON[feature]
    original = tok.chat_template
    tok.chat_template = original.replace("{%- for m in messages -%}{%- if m.role == 'user' or",
                                         "{%- for m in messages -%}" + guard + "{%- if m.role == 'user' or")
    assert tok.chat_template != original
    try:
        t = get_template("hf", tok)
        f = t.info["features"]
        assert not f[feature]["supported"] and [k for k, v in f.items() if not v["supported"]] == (
            ["tool_calls", "tool_results"] if feature == "tool_calls" else [feature])
        # A plain dialogue renders exactly as before: the ids are the template's, the same answers learned.
        s = rendered(tok, REC)
        assert marked(tok, s) == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\n«Hello!<|im_end|>»\n<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n«<think>\n\n</think>\n\nSee you.<|im_end|>»\n")
        # A record that uses the feature is refused, naming it and what the template does.
        with pytest.raises(BadRecord) as e:
            render_conversation(record, tok, "hf", source="r.jsonl:9")
        assert e.value.reason == f"{feature}_unsupported" and e.value.detail == f"messages[{index}] {why}"
        assert str(e.value).startswith(f"r.jsonl:9: {feature}_unsupported: ")
        r = template_report(t, tok, [parse_record(REC, "r.jsonl:1"), parse_record(record, "r.jsonl:2")])
        assert r["records"]["refused"] == {f"{feature}_unsupported": 1} and r["records"]["rendered"] == 1
        text = format_report(r)
        label = {"tool_calls": "tool calls", "reasoning": "reasoning_content"}[feature]
        assert f"  {label:<20}UNSUPPORTED: the template {why.split('the template ')[1]}; records that use it " \
               f"are refused ({feature}_unsupported)" in text
    finally:
        tok.chat_template = original


def test_j_generation_markers_that_learn_past_the_stop_are_not_used(family):
    tok = family("smol")
    tok.chat_template = SMOL.replace("{{- m.content + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}",
                                     "{{- m.content + '<|im_end|>\\n' -}}{%- endgeneration -%}")
    assert tok.chat_template != SMOL
    try:
        t = get_template("hf", tok)
        assert t.info["strategy"] == "located"
        assert "also learn '\\n'" in t.info["markers_note"]
        s = rendered(tok, REC)
        assert marked(tok, s).endswith("<|im_start|>assistant\n«See you.<|im_end|>»\n")
    finally:
        tok.chat_template = SMOL


# --------------------------------------------------------------------- properties

ALPHABET = list("abcXYZ019 .,!?'\n\té问答€😀")
TEXT = st.text(alphabet=st.sampled_from(ALPHABET), min_size=0, max_size=16)


@st.composite
def dialogues(draw, name, tools_too=False):
    """A record the family's template can render: tagged texts (§U1§ ...) so what is learned can be told
    apart from what is not whatever the random text is. `tools_too`: tool calls and results even where
    the family does not render them all."""
    fam = FAMILIES[name]
    msgs, n = [], 0
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": "§S§" + draw(TEXT)})
    tools = None
    for turn in range(draw(st.integers(1, 3))):
        # Now and then a blank question: nothing to find it by.
        msgs.append({"role": "user", "content": draw(st.sampled_from([f"§U{turn}§" + draw(TEXT)] * 5 + [" ", "\n"]))})
        steps = draw(st.integers(0, 2)) if (fam.tools or tools_too) and not fam.alternate else 0
        for step in range(steps + 1):
            answer = {"role": "assistant", "content": f"§A{n}§" + draw(TEXT)}
            if fam.reasoning and draw(st.booleans()):
                answer["reasoning_content"] = f"§R{n}§" + draw(TEXT)
            calling = step < steps
            if calling:
                tools = TOOLS
                args = {"to": draw(TEXT)}
                calls = [{"type": "function", "function": {"name": "route", "arguments": args}}]
                if name in ("mistral", "llama31"):  # their templates write the call in place of any text
                    answer["content"] = None
                elif draw(st.booleans()):
                    answer["content"] = None
                answer["tool_calls"] = calls
            msgs.append(answer)
            n += 1
            if calling:
                msgs.append({"role": "tool", "content": f"§T{n}§" + draw(TEXT), "tool_call_id": f"c{n}",
                             "name": "route"})
    if draw(st.integers(0, 4)) == 0:
        msgs.append({"role": "user", "content": "§U9§" + draw(TEXT)})  # a question left unanswered: kept, not learned
    record = {"messages": msgs}
    if tools:
        record["tools"] = tools
    return record


def answers_learned(tok, s):
    out = []
    for k in sorted(set(s.answer_of_token[s.labels != IGNORE].tolist())):
        ids = s.input_ids[(s.answer_of_token == k) & (s.labels != IGNORE)]
        out.append(tok.decode(ids.tolist(), clean_up_tokenization_spaces=False))
    return out


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


VARIANTS = [(name, {}) for name in sorted(FAMILIES)] + [("gemma4", {"enable_thinking": True}),
                                                         ("kimi", {"thinking": False}),
                                                         ("qwen3", {"enable_thinking": False})]


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=[f"{n}{'-' + str(k) if k else ''}" for n, k in VARIANTS])
@SETTINGS
@given(data=st.data())
def test_every_family_on_random_dialogues(family, name, kwargs, data):
    tok = family(name)
    fam = FAMILIES[name]
    record = data.draw(dialogues(name))
    t = get_template("hf", tok, None, kwargs)
    s = rendered(tok, record, folded=t.info["system"].startswith("folded"), ids=fam.call_ids, **kwargs)
    # The hot path (headers in order) and the report's walk (every message found) place alike.
    conv = parse_record(record)
    assert t.segments(conv.messages, conv.tool_schemas) == t.explain(conv.messages, conv.tool_schemas, Counter())
    answers = [m for m in record["messages"] if m["role"] == "assistant"]
    learned = answers_learned(tok, s)
    assert len(learned) == len(answers)  # every answer learns something
    stops = t.info["stops"]
    final_user = max(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
    for k, (m, text) in enumerate(zip(answers, learned)):
        # Nothing of another message is learned; every tag of this answer is.
        assert "§U" not in text and "§S" not in text and "§T" not in text
        assert all(f"§A{j}§" not in text for j in range(len(answers)) if j != k)
        if m.get("content") is not None:
            body = m["content"].strip() if fam.trims else m["content"]
            assert body in text
        for call in m.get("tool_calls", []):
            assert call["function"]["name"] in text  # by name, or inside its id functions.NAME:IDX
        index = record["messages"].index(m)
        if m.get("reasoning_content") and index > final_user and fam.reasoning:
            assert m["reasoning_content"].strip() in text  # a final answer's reasoning is learned
        # The stop is learned, where the template writes one after this answer.
        last = index == len(record["messages"]) - 1
        if t.info["stop_kind"] == "end-of-turn marker" or not last:
            assert any(text.endswith(stop) for stop in stops), (text, stops)


@SETTINGS
@given(data=st.data())
def test_echo_refuses_exactly_the_records_with_tool_results(family, data):
    tok = family("gemma4_echo")
    record = data.draw(dialogues("gemma4_echo", tools_too=True))
    results = [i for i, m in enumerate(record["messages"]) if m["role"] == "tool"]
    if results:
        with pytest.raises(BadRecord) as e:
            render_conversation(record, tok, "hf")
        assert e.value.reason == "tool_results_unsupported" and e.value.detail.startswith(f"messages[{results[0]}] ")
    else:  # with or without calls and reasoning: exactly the template's ids, every answer learned
        s = rendered(tok, record)
        assert len(answers_learned(tok, s)) == sum(m["role"] == "assistant" for m in record["messages"])


@pytest.mark.parametrize("name", ["glm", "qwen3"])
@SETTINGS
@given(data=st.data())
def test_think_policies_on_random_dialogues(family, name, data):
    tok = family(name)
    record = data.draw(dialogues(name))
    base = rendered(tok, record)
    for think in ("learn", "mask_empty", "drop_history"):
        s = rendered(tok, record, think=think)
        assert s.input_ids.tolist() == base.input_ids.tolist()  # the policy never changes the ids
        learned = "".join(answers_learned(tok, s))
        every = "".join(answers_learned(tok, rendered(tok, record, think="learn")))
        assert len(learned) <= len(every)
        if think == "mask_empty":
            assert "<think></think>" not in learned and "<think>\n\n</think>" not in learned


# ------------------------------------------------------------------------ report


@pytest.mark.parametrize("name", ["qwen3", "glm", "gemma4"])
def test_report_says_strategy_stops_policy_roles_and_refusals(family, name):
    tok = family(name)
    t = get_template("hf", tok)
    bad = json.loads(json.dumps(REC))
    bad["messages"][2]["content"] = f"Hello{t.info['stops'][0]}"
    records = [parse_record(REC, "d.jsonl:1"), parse_record(TOOL_REC, "d.jsonl:2"),
               parse_record(with_reasoning(REC, "Greet back.", "Say goodbye."), "d.jsonl:3"),
               parse_record(bad, "d.jsonl:4")]
    r = template_report(t, tok, records)
    assert r["strategy"] == "located" and r["records"]["rendered"] == 3
    assert r["records"]["refused"] == {"control_token_in_content": 1}
    assert r["records"]["refused_examples"]["control_token_in_content"].startswith("d.jsonl:4: ")
    for role in ("system", "user", "tool", "template"):
        assert r["roles"][role]["learned"] == 0
    assert r["roles"]["assistant"]["learned"] > 0
    text = format_report(r)
    assert "think policy" in text and t.think in text and "stop learned" in text


def test_template_verb_prints_the_report(tmp_path, tiny_llama_dir, capsys):
    from chatsft.cli import main

    build("qwen3", tmp_path / "qwen3")
    data = tmp_path / "d.jsonl"
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "say <|im_end|>"}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in (REC, TOOL_REC, bad)))
    overrides = [f"model.name_or_path={tiny_llama_dir}", f"model.tokenizer={tmp_path / 'qwen3'}",
                 f"data.train={data}", "data.template=hf"]
    assert main(["template", str(_config(tmp_path)), *overrides]) == 0
    out = capsys.readouterr().out
    assert "chat template: hf  (strategy: located" in out
    assert "think policy          drop_history (default: the template renders reasoning for the final" in out
    assert "first 3 records: 2 rendered, 1 refused" in out
    assert f"refused control_token_in_content: 1, e.g. {data}:3: control_token_in_content" in out
    # A think policy set in the config is reported as such.
    assert main(["template", str(_config(tmp_path)), *overrides, "data.think=mask_empty"]) == 0
    assert "mask_empty (set in data.think; the template's default is drop_history)" in capsys.readouterr().out


def _config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\n")
    return path
