import json

import pytest

from chatsft.data.conversation import (REASONS, BadRecord, Conversation, Message, Part, iter_lines,
                                       merge_system, parse_line)

OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


# Every reason that can come from the record itself, with the line that causes it
# and the message the user sees (reasons that need a template are tested in test_templates).
CASES = {
    "invalid_utf8": (b'{"messages": "\xff"}', "f.jsonl:7: invalid_utf8: the line is not valid UTF-8: byte 14"),
    "invalid_json": (b'{"messages": [', "f.jsonl:7: invalid_json: the line is not valid JSON"),
    "not_an_object": (b"[1, 2]", "f.jsonl:7: not_an_object: the record is not a JSON object: got list"),
    "missing_messages": (_line({"msgs": []}), "f.jsonl:7: missing_messages: the record has no 'messages' key"),
    "messages_not_a_list": (_line({"messages": "hi"}), "f.jsonl:7: messages_not_a_list: 'messages' is not a list: got str"),
    "empty_messages": (_line({"messages": []}), "f.jsonl:7: empty_messages: 'messages' is empty"),
    "message_not_an_object": (_line({"messages": ["hi"]}),
                              "f.jsonl:7: message_not_an_object: a message is not a JSON object: messages[0] is str"),
    "unknown_role": (_line({"messages": [{"role": "bot", "content": "x"}]}),
                     "f.jsonl:7: unknown_role: a message has a role other than system, user, assistant, tool: "
                     "messages[0].role = 'bot'"),
    "bad_content": (_line({"messages": [{"role": "user", "content": 3}]}),
                    "f.jsonl:7: bad_content: a message's content is not a string or a list of parts: "
                    "messages[0].content is int"),
    "bad_part": (_line({"messages": [{"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}),
                 "f.jsonl:7: bad_part: a content part is not {type, text} with a known type and string text: "
                 "messages[0].content[0] ('image')"),
    "empty_answer": (_line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
                     "f.jsonl:7: empty_answer: an assistant message has no content: messages[1]"),
    "no_assistant": (_line({"messages": [{"role": "user", "content": "q"}]}),
                     "f.jsonl:7: no_assistant: the dialogue has no assistant message to learn from"),
    "bad_reasoning": (_line({"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", "reasoning_content": ["r"]}]}),
                      "f.jsonl:7: bad_reasoning: an assistant message's reasoning_content is not a string: "
                      "messages[1].reasoning_content is list"),
    "bad_tool_call": (_line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                                                             "tool_calls": [{"name": "f"}]}]}),
                      'f.jsonl:7: bad_tool_call: a tool call is not {"type": "function", "function": '
                      '{"name", "arguments"}}: messages[1].tool_calls[0]'),
    "bad_tool_message": (_line({"messages": [{"role": "user", "content": "q"},
                                             {"role": "tool", "content": "5", "tool_call_id": 7},
                                             {"role": "assistant", "content": "a"}]}),
                         "f.jsonl:7: bad_tool_message: a tool message's tool_call_id or name is not a string: "
                         "messages[1].tool_call_id is int"),
    "bad_tool_arguments": (_line({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{to: station}"}}]}]}),
        "f.jsonl:7: bad_tool_arguments: a tool call's arguments are text that is not JSON of an object "
        "(data.tool_arguments): messages[1].tool_calls[0].function.arguments is not JSON (Expecting property "
        "name enclosed in double quotes at column 2: '{to: station}'); set data.tool_arguments=keep_text"),
    "bad_tools": (_line({"tools": {"name": "f"}, "messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}),
                  "f.jsonl:7: bad_tools: the record's tools is not a list of JSON schema objects: got dict"),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_invalid_record_has_its_reason_and_message(reason):
    line, message = CASES[reason]
    with pytest.raises(BadRecord) as e:
        parse_line(line, "f.jsonl:7")
    assert e.value.reason == reason
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_every_reason_is_tested_somewhere():
    template_reasons = {"bad_order", "unsupported_role", "control_token_in_content", "template_error",
                        "unsupported_field", "answer_not_in_render", "answer_not_located", "reasoning_not_rendered",
                        "tool_call_not_in_render", "generation_mask_mismatch", "reasoning_unsupported",
                        "tool_calls_unsupported", "tool_results_unsupported"}
    assert set(REASONS) == set(CASES) | template_reasons


def test_parts_and_roles_parse():
    conv = parse_line(_line({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"},
                                          {"type": "text", "text": "It is 2."}]},
        {"role": "tool", "content": "ok"}]}), "x:1")
    assert conv.messages[2].content == (Part("python", "1+1"), Part("python_output", "2"), Part("text", "It is 2."))
    assert conv.messages[2].text == "1+12It is 2."
    assert conv.source == "x:1"
    assert parse_line(_line(conv.to_record())).messages == conv.messages


def test_reasoning_and_tool_fields_parse_and_round_trip():
    call = {"type": "function", "function": {"name": "route", "arguments": {"to": "station"}}}
    record = {"tools": [{"type": "function", "function": {"name": "route", "parameters": {}}}], "messages": [
        {"role": "user", "content": "How far?"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "Look it up."},
        {"role": "tool", "content": "2 km", "tool_call_id": "c1", "name": "route"},
        {"role": "assistant", "content": "2 km.", "tool_calls": [
            {"type": "function", "function": {"name": "log", "arguments": '{"x": 1}'}}]}]}
    conv = parse_line(_line(record), "t:1")
    ask, tool, answer = conv.messages[1], conv.messages[2], conv.messages[3]
    assert ask.content is None and ask.text == "" and ask.reasoning == "Look it up."
    assert [t.name for t in ask.tool_calls] == ["route"] and ask.tool_calls[0].arguments == {"to": "station"}
    assert answer.tool_calls[0].arguments == '{"x": 1}'  # a string of JSON stays a string, as the record had it
    assert (tool.tool_call_id, tool.name) == ("c1", "route")
    assert conv.tool_schemas == record["tools"]
    assert conv.to_record() == record
    assert hash(conv) == hash(parse_line(_line(record), "t:1"))


def test_tool_arguments_as_an_object_or_json_text_and_the_call_id():
    def record(*calls):
        return {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": None, "tool_calls": list(calls)}]}

    obj = {"type": "function", "function": {"name": "route", "arguments": {"to": "station", "n": [1, 2]}}}
    text = {"type": "function", "id": "call_7", "function": {"name": "route",
                                                              "arguments": '{"to": "station", "n": [1, 2]}'}}
    a, b = parse_line(_line(record(obj, text))).messages[1].tool_calls
    assert a.arguments_object == b.arguments_object == {"to": "station", "n": [1, 2]}
    assert isinstance(b.arguments, str)  # the record's own spelling is kept; templates get what they render
    assert (a.id, b.id) == (None, "call_7")
    # Text that is not JSON of an object: refused naming the call, or kept as text when the config says so.
    for bad, says in (("{to: station}", "is not JSON"), ("[1, 2]", "is JSON of a list, not of an object"),
                      ('"station"', "is JSON of a str, not of an object")):
        call = {"type": "function", "function": {"name": "route", "arguments": bad}}
        with pytest.raises(BadRecord) as e:
            parse_line(_line(record(obj, call)), "t.jsonl:3")
        assert e.value.reason == "bad_tool_arguments" and str(e.value).startswith("t.jsonl:3: bad_tool_arguments")
        assert f"messages[1].tool_calls[1].function.arguments {says}" in str(e.value)
        kept = parse_line(_line(record(obj, call)), "t.jsonl:3", tool_arguments="keep_text").messages[1].tool_calls[1]
        assert kept.arguments == bad and kept.arguments_object is None
    with pytest.raises(BadRecord) as e:
        parse_line(_line(record({**obj, "id": 5})))
    assert e.value.reason == "bad_tool_call"


def test_lines_blank_bom_and_crlf():
    data = b"\xef\xbb\xbf" + _line(OK) + b"\r\n\r\n   \n" + _line(OK) + b"\r\n"
    lines = list(iter_lines(data, "d.jsonl"))
    assert [src for src, _ in lines] == ["d.jsonl:1", "d.jsonl:4"]
    assert all(parse_line(raw, src).messages[1].text == "hello" for src, raw in lines)


def test_merge_system_folds_into_first_user():
    msgs = (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"))
    assert merge_system(msgs) == (Message("user", "Be brief.\n\nHi"), Message("assistant", "Hello"))
    assert merge_system(msgs[1:]) == msgs[1:]


def test_conversation_is_hashable_and_frozen():
    conv = Conversation((Message("user", "a"),), "s:1")
    with pytest.raises(Exception):
        conv.source = "other"  # type: ignore[misc]


def test_readme_lists_every_reason_as_the_code_states_it():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for reason, text in REASONS.items():
        assert f"- `{reason}`: {text}\n" in readme, reason
