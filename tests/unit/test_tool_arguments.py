"""Tool-call arguments, given as an object or as JSON text: the template gets what it renders as a JSON
object (the probes tell which), never a string of a string; text that is not JSON is refused or, by
data.tool_arguments=keep_text, kept; Parquet stores arguments as JSON text, so records whose tools take
different arguments share one Arrow schema, and a `messages` column may be JSON text.

Plus `chatsft template` on the Gemma-4-style and Kimi-K2-style templates: the features table and the
serving-parity figure."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chat_families import GEMMA4, KIMI, build
from chatsft.data import render_conversation
from chatsft.data.conversation import BadRecord, parse_record
from chatsft.data.preview import runs
from chatsft.data.render import IGNORE
from chatsft.data.templates import get_template
from chatsft.sources import read_local

# A ChatML-like template whose call writes the arguments one way or another (CALL below).
BASE = ("{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' -}}"
        "{%- if m.content is string -%}{{- m.content -}}{%- endif -%}"
        "{%- for call in m.tool_calls or [] -%}{{- '<tool_call>' + call.function.name + ' ' -}}CALL"
        "{{- '</tool_call>' -}}{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
TOJSON = BASE.replace("CALL", "{{- call.function.arguments | tojson -}}")  # a string would be encoded again
PRINTS = BASE.replace("CALL", "{{- call.function.arguments -}}")  # an object would print as Python's repr
ARGS = {"to": "station", "n": 2}
TEXT = '{"n":2,"to":"station"}'  # the same object, spelled otherwise


def record(arguments):
    return {"messages": [{"role": "user", "content": "How far?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"type": "function", "function": {"name": "route", "arguments": arguments}}]},
                         {"role": "tool", "content": "2 km"}, {"role": "assistant", "content": "2 km."}]}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture
def templated(qwen):
    original = qwen.chat_template

    def use(source):
        qwen.chat_template = source
        return qwen

    yield use
    qwen.chat_template = original


def marked(tok, s):
    return "".join(f"«{text}»" if learned else text for text, learned in runs(tok, s.input_ids, s.labels))


def ids(tok, messages, **kwargs):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


@pytest.mark.parametrize("source, wants", [(TOJSON, "object"), (PRINTS, "text")], ids=["tojson", "prints"])
def test_the_template_gets_what_it_renders_as_an_object(templated, source, wants):
    tok = templated(source)
    t = get_template("hf", tok)
    assert t.info["features"]["tool_calls"]["how"] == f"named by the function, arguments given as " \
                                                      f"{'an object' if wants == 'object' else 'JSON text'}"
    for given in (ARGS, TEXT):
        (s,) = render_conversation(record(given), tok, t).samples
        # What the template gets: the object (JSON text decoded), or JSON text (an object encoded; text as given).
        if wants == "object":
            handed = json.loads(given) if isinstance(given, str) else given
        else:
            handed = given if isinstance(given, str) else json.dumps(given)
        assert s.input_ids.tolist() == ids(tok, record(handed)["messages"])
        text = tok.decode(s.input_ids.tolist())
        assert '\\"' not in text and "'to'" not in text  # never a string of a string, never Python's repr
        shown = json.dumps(handed) if wants == "object" else handed
        assert marked(tok, s) == (
            "<|im_start|>user\nHow far?<|im_end|>\n<|im_start|>assistant\n"
            f"«<tool_call>route {shown}</tool_call><|im_end|>»\n<|im_start|>tool\n2 km<|im_end|>\n"
            "<|im_start|>assistant\n«2 km.<|im_end|>»\n")


def test_arguments_that_are_not_json_are_refused_or_kept_as_text(templated):
    tok = templated(PRINTS)
    with pytest.raises(BadRecord) as e:
        render_conversation(record("to=station"), tok, "hf", source="t.jsonl:4")
    assert str(e.value).startswith("t.jsonl:4: bad_tool_arguments: a tool call's arguments are text that is not "
                                   "JSON of an object (data.tool_arguments): messages[1].tool_calls[0].function."
                                   "arguments is not JSON")
    (s,) = render_conversation(record("to=station"), tok, "hf", tool_arguments="keep_text").samples
    assert s.input_ids.tolist() == ids(tok, record("to=station")["messages"])
    assert "«<tool_call>route to=station</tool_call><|im_end|>»" in marked(tok, s)


def test_parquet_arguments_as_json_text_fit_one_schema_and_messages_may_be_json_text(qwen, tmp_path):
    calls = [("route", {"to": "station"}), ("convert", {"amount": 2.5, "units": ["km", "mi"], "exact": True})]
    records = []
    for name, args in calls:
        records.append({"tools": [{"type": "function", "function": {"name": name, "parameters": {}}}],
                        "messages": [{"role": "user", "content": f"Use {name}."},
                                     {"role": "assistant", "content": None, "tool_calls": [
                                         {"type": "function", "function": {"name": name, "arguments": args}}]},
                                     {"role": "tool", "content": "done", "tool_call_id": "c1", "name": name},
                                     {"role": "assistant", "content": "Done."}]})
    as_text = json.loads(json.dumps(records))
    for r in as_text:
        r["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps(
            r["messages"][1]["tool_calls"][0]["function"]["arguments"])
        r["tools"] = json.dumps(r["tools"])
    table = pa.Table.from_pylist(as_text)  # one schema: arguments is a string column whatever the tool
    fn = table.schema.field("messages").type.value_type.field("tool_calls").type.value_type.field("function")
    assert fn.type.field("arguments").type == pa.string()
    pq.write_table(table, tmp_path / "struct.parquet")
    pq.write_table(pa.table({"messages": [json.dumps(r["messages"]) for r in records],
                             "tools": [json.dumps(r["tools"]) for r in records]}), tmp_path / "text.parquet")
    for path in ("struct.parquet", "text.parquet"):
        convs = list(read_local(str(tmp_path / path)))
        assert [c.source for c in convs] == [f"{tmp_path / path}:1", f"{tmp_path / path}:2"]
        for conv, r in zip(convs, records):
            assert conv.messages[1].tool_calls[0].arguments_object == r["messages"][1]["tool_calls"][0]["function"][
                "arguments"]
            (got,) = render_conversation(conv, qwen, "hf").samples
            (want,) = render_conversation(parse_record(r, conv.source), qwen, "hf").samples
            assert got.input_ids.tolist() == want.input_ids.tolist() == ids(qwen, r["messages"], tools=r["tools"])
            assert got.labels.tolist() == want.labels.tolist() and (got.labels != IGNORE).any()
    pq.write_table(pa.table({"messages": ["[{not json"]}), tmp_path / "bad.parquet")
    (bad,) = read_local(str(tmp_path / "bad.parquet"))
    assert isinstance(bad, BadRecord) and bad.reason == "messages_not_a_list"
    assert bad.source == f"{tmp_path / 'bad.parquet'}:1"


@pytest.mark.parametrize("name, source, kwargs", [("gemma4", GEMMA4, "{enable_thinking: false}"),
                                                  ("gemma4", GEMMA4, "{enable_thinking: true}"),
                                                  ("kimi", KIMI, "{}")], ids=["gemma4", "gemma4-thinking", "kimi"])
def test_template_verb_reports_features_and_serving_parity(tmp_path, tiny_llama_dir, capsys, name, source, kwargs):
    from chatsft.cli import main

    build(name, tmp_path / name)
    tools = [{"type": "function", "function": {"name": "route", "description": "Distance to a place.",
                                               "parameters": {"type": "object",
                                                              "properties": {"to": {"type": "string"}}}}}]
    agent = {"tools": tools, "messages": [
        {"role": "user", "content": "How far is the station?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should look it up.",
         "tool_calls": [{"type": "function", "function": {"name": "route", "arguments": '{"to": "station"}'}}]},
        {"role": "tool", "content": "2 km", "tool_call_id": "functions.route:0", "name": "route"},
        {"role": "assistant", "content": "It is 2 km.", "reasoning_content": "Answer with the number."},
        {"role": "user", "content": "And back?"}, {"role": "assistant", "content": "Also 2 km."}]}
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "See you.", "reasoning_content": "Say goodbye."}]}
    broken = json.loads(json.dumps(agent))
    broken["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{to: station"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (chat, agent, broken)))
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\n")
    overrides = [f"model.name_or_path={tiny_llama_dir}", f"model.tokenizer={tmp_path / name}", f"data.train={data}",
                 "data.template=hf", f"data.chat_template_kwargs={kwargs}"]
    assert main(["template", str(config), *overrides]) == 0
    out = capsys.readouterr().out
    print(out)  # the report as a user reads it (pytest -s shows it)
    assert "features\n  reasoning_content   supported: " in out
    assert "\n  tool results        supported: context, never learned\n" in out
    assert f"first 3 records: 2 rendered, 1 refused" in out
    assert f"refused bad_tool_arguments: 1, e.g. {data}:3: bad_tool_arguments" in out
    if name == "kimi":
        assert "\n  tool calls          supported: named by their id (calls without one get functions.NAME:IDX)" in out
        assert "serving parity: 4 of 5 answers (80.0%)" in out
        assert "differ 1: the record's render drops earlier reasoning that the prompt at inference holds, " \
               f"e.g. {data}:2 answer 1" in out
    elif "true" in kwargs:
        assert "template variables    enable_thinking=True" in out
        assert "serving parity: 4 of 5 answers (80.0%)" in out
    else:
        assert "the answer stops at '<|tool_response>' after its calls" in out
        assert "serving parity: 0 of 5 answers (0.0%)" in out
        assert "differ 4: the generation prompt adds '<|channel>thought\\n<channel|>', which the history does " \
               "not hold" in out


def test_prepare_refuses_arguments_that_are_not_json_in_one_line_before_ray_starts(tmp_path, tiny_llama_dir, capsys):
    import ray

    from chatsft.cli import main

    ray.shutdown()  # an earlier test's shared local Ray would hide whether prepare started one
    good = record(ARGS)
    data = tmp_path / "calls.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(record("{to: station")) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\ndata: {{train: {data}}}\n")
    assert main(["prepare", str(config), f"model.name_or_path={tiny_llama_dir}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"chatsft prepare: error: {data}:2: bad_tool_arguments: a tool call's arguments are text that is "
                   "not JSON of an object (data.tool_arguments): messages[1].tool_calls[0].function.arguments is not "
                   "JSON (Expecting property name enclosed in double quotes at column 2: '{to: station'); set "
                   "data.tool_arguments=keep_text to train on it as the text it is\n")
    assert not ray.is_initialized() and not (tmp_path / "run" / "data").exists()


def test_keys_document_the_new_data_keys_and_show_a_configs_mapping(tmp_path):
    from pathlib import Path

    from chatsft.cli import keys_listing

    text = keys_listing(["data.tool_arguments"])
    assert text.startswith("data.tool_arguments = 'json'\n") and "keep_text" in text and "bad_tool_arguments" in text
    recipe = Path(__file__).resolve().parents[2] / "configs" / "gemma4-31b-lora.yaml"
    text = keys_listing([str(recipe), "data.chat_template_kwargs"])
    assert "* data.chat_template_kwargs = {'enable_thinking': False}   (default {})" in text
    text = keys_listing([str(recipe), "scaling.resources_per_worker"])  # a mapping key showed its default
    assert "* scaling.resources_per_worker = {'CPU': 8.0, 'GPU': 1.0}   (default {})" in text
