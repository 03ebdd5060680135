"""Chat templates written for these tests in the style of the families people fine-tune, and
byte-level BPE tokenizers that carry their markers (built locally, no hub).

Each template reproduces the behaviour the locator must handle, not any published text:
qwen3     history answers lose their reasoning; the final one gets a think block, empty if none (a)
mistral   the system prompt goes into the last user turn; `[/INST]` then " " before the answer (b, g)
phi3      every turn ends with <|end|>, and eos follows the last message (c)
glm       no end-of-turn marker: the next role tag is where the model stops; <think></think>
          before each earlier answer (d)
llama31   a system header with a date even without a system message; content trimmed;
          a tool call replaces the answer's text (e, h)
gemma4    the generation prompt closes an empty thought channel the history never shows, unless
          enable_thinking (which also opens a system turn with <|think|>) (f); a thought channel
          for answers after the last user message; calls written `call:NAME{key:<|"|>value<|"|>}`
          from an object (text arguments would be printed raw inside the braces); tool results
          written into the model's own turn right after its calls, the next answer continuing that
          turn with no header, and `<|tool_response>` the model's stop after calls (Gemma 4)
gemma4_echo  a Gemma variant that writes tool output into the next model turn, after its header
kimi      Kimi K2 style: calls named by their id (`functions.NAME:IDX`), not by the function, in a
          `<|tool_calls_section_begin|>` section; `<think></think>` before earlier answers, the
          final ones' reasoning in `<think>`; `thinking=false` closes an empty think block in the
          generation prompt
gemma2    raises on a system message; roles must alternate; content trimmed (i)
smol      {% generation %} markers around the answer and its end token (j)
deepseek  after tool results the answer follows the results' closing marker with no assistant header:
          the one family whose answers need their own prompt rendered (the locator's fallback)
"""

from __future__ import annotations

from dataclasses import dataclass, field

QWEN3 = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n<tools>' -}}{%- for t in tools -%}{{- '\\n' + t | tojson -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if not reasoning and '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- content -}}"
    "{%- for call in m.tool_calls or [] -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' -}}"
    "{{- call.function.arguments if call.function.arguments is string else call.function.arguments | tojson -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

MISTRAL = (
    "{%- if messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- set users = rest | selectattr('role', 'equalto', 'user') | list -%}"
    "{{- bos_token -}}"
    "{%- for m in rest -%}"
    "{%- if m.role == 'user' -%}"
    "{%- if tools and m == users[-1] -%}{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}"
    "{%- if system is defined and m == users[-1] -%}"
    "{{- '[INST] ' + system + '\\n\\n' + m.content + '[/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + m.content + '[/INST]' -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' and m.tool_calls -%}"
    "{{- '[TOOL_CALLS] ' + (m.tool_calls | map(attribute='function') | list | tojson) + eos_token -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- ' ' + m.content | trim + eos_token -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '[TOOL_RESULTS] ' + {'content': m.content, 'call_id': m.tool_call_id} | tojson + '[/TOOL_RESULTS]' -}}"
    "{%- else -%}{{- raise_exception('Only user, assistant and tool roles after one system message') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

PHI3 = (
    "{%- for m in messages -%}"
    "{%- if m.role not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Only system, user and assistant roles are supported') -}}{%- endif -%}"
    "{{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)

GLM = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}{{- '<|system|>\\n# Tools' -}}"
    "{%- for t in tools -%}{{- '\\n' + t | tojson -}}{%- endfor -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- '<|system|>\\n' + m.content -}}"
    "{%- elif m.role == 'user' -%}{{- '<|user|>\\n' + m.content -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- if loop.index0 > ns.last_user and m.reasoning_content -%}"
    "{{- '\\n<think>' + m.reasoning_content.strip() + '</think>' -}}"
    "{%- else -%}{{- '\\n<think></think>' -}}{%- endif -%}"
    "{%- if content.strip() -%}{{- '\\n' + content.strip() -}}{%- endif -%}"
    "{%- for call in m.tool_calls or [] -%}"
    "{{- '\\n<tool_call>' + call.function.name -}}"
    "{%- for k, v in call.function.arguments.items() -%}"
    "{{- '\\n<arg_key>' + k + '</arg_key>\\n<arg_value>' + (v if v is string else v | tojson) + '</arg_value>' -}}"
    "{%- endfor -%}"
    "{{- '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '\\n<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)

LLAMA31 = (
    "{{- bos_token -}}"
    "{%- if date_string is not defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
    "{%- if messages[0].role == 'system' -%}"
    "{%- set system = messages[0].content | trim -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{%- if tools -%}{{- 'Environment: ipython\\n' -}}{%- endif -%}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' -}}"
    "{%- if tools -%}{{- 'Functions, called as one JSON object:\\n' -}}"
    "{%- for t in tools -%}{{- t | tojson + '\\n' -}}{%- endfor -%}{{- '\\n' -}}{%- endif -%}"
    "{{- system + '<|eot_id|>' -}}"
    "{%- for m in rest -%}"
    "{%- if m.role == 'assistant' and m.tool_calls -%}"
    "{%- if m.tool_calls | length != 1 -%}{{- raise_exception('One tool call per message') -}}{%- endif -%}"
    "{%- set call = m.tool_calls[0].function -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + call.name + '\", \"parameters\": ' -}}"
    "{{- call.arguments if call.arguments is string else call.arguments | tojson -}}"
    "{{- '}<|eot_id|>' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_GEMMA4_ARG = (  # a value as Gemma 4 prints one: strings quoted with the <|"|> token, keys sorted, bare
    "{%- macro arg(v) -%}"
    "{%- if v is string -%}{{- '<|\"|>' + v + '<|\"|>' -}}"
    "{%- elif v is boolean -%}{{- 'true' if v else 'false' -}}"
    "{%- elif v is mapping -%}{{- '{' -}}{%- for k, x in v | dictsort -%}{{- k + ':' + arg(x) -}}"
    "{%- if not loop.last -%}{{- ',' -}}{%- endif -%}{%- endfor -%}{{- '}' -}}"
    "{%- elif v is sequence -%}{{- '[' -}}{%- for x in v -%}{{- arg(x) -}}{%- if not loop.last -%}{{- ',' -}}"
    "{%- endif -%}{%- endfor -%}{{- ']' -}}"
    "{%- elif v is none -%}{{- 'null' -}}{%- else -%}{{- v | string -}}{%- endif -%}"
    "{%- endmacro -%}"
)
_GEMMA4_HEAD = (
    "{{- bos_token -}}"
    "{%- set think = enable_thinking is defined and enable_thinking -%}"
    "{%- set ns = namespace(last_user=-1, prev='', scan=false, pending=[]) -%}"
    "{%- set rest = messages[1:] if messages[0].role == 'system' else messages -%}"
    "{%- if think or tools or messages[0].role == 'system' -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if think -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content | trim -}}{%- endif -%}"
    "{%- for t in tools or [] -%}"
    "{{- '<|tool>declaration:' + t.function.name + '{description:' + arg(t.function.description or '') + '}<tool|>' -}}"
    "{%- endfor -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in rest -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
)
_GEMMA4_BODY = (  # an answer's thought channel, text and calls
    "{%- if m.reasoning_content and loop.index0 > ns.last_user -%}"
    "{{- '<|channel>thought\\n' + m.reasoning_content + '<channel|>' -}}"
    "{%- endif -%}"
    "{%- if m.content is string -%}{{- m.content.split('<channel|>')[-1] | trim -}}{%- endif -%}"
    "{%- for call in m.tool_calls or [] -%}"
    "{{- '<|tool_call>call:' + call.function.name + '{' -}}"
    "{%- if call.function.arguments is mapping -%}"
    "{%- for k, v in call.function.arguments | dictsort -%}{{- k + ':' + arg(v) -}}"
    "{%- if not loop.last -%}{{- ',' -}}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{- call.function.arguments -}}{%- endif -%}"
    "{{- '}<tool_call|>' -}}"
    "{%- endfor -%}"
)
_GEMMA4_RESULT = "'<|tool_response>response:' + (f.name or 'tool') + '{value:' + arg(f.content) + '}<tool_response|>'"

GEMMA4 = (
    _GEMMA4_ARG + _GEMMA4_HEAD +
    "{%- for m in rest -%}"
    "{%- if m.role != 'tool' -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{%- if not (role == 'model' and ns.prev == 'tool_response') -%}{{- '<|turn>' + role + '\\n' -}}{%- endif -%}"
    "{%- set ns.prev = role -%}"
    "{%- if role == 'model' -%}" + _GEMMA4_BODY +
    "{%- else -%}{{- m.content | trim -}}{%- endif -%}"
    "{%- if m.tool_calls -%}"
    "{%- set ns.scan = true -%}"
    "{%- for f in rest[loop.index0 + 1:] -%}"
    "{%- if f.role != 'tool' -%}{%- set ns.scan = false -%}{%- endif -%}"
    "{%- if ns.scan -%}{{- " + _GEMMA4_RESULT + " -}}{%- set ns.prev = 'tool_response' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.prev != 'tool_response' -%}{{- '<|tool_response>' -}}{%- endif -%}"
    "{%- else -%}{{- '<turn|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if ns.prev != 'tool_response' -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
    "{%- if not think -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"
    "{%- endif -%}"
)

GEMMA4_ECHO = (  # tool output kept back and written into the next model turn, after its header
    _GEMMA4_ARG + _GEMMA4_HEAD +
    "{%- for m in rest -%}"
    "{%- if m.role == 'tool' -%}{%- set ns.pending = ns.pending + [m] -%}"
    "{%- else -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if role == 'model' -%}"
    "{%- for f in ns.pending -%}{{- " + _GEMMA4_RESULT + " -}}{%- endfor -%}{%- set ns.pending = [] -%}"
    + _GEMMA4_BODY +
    "{%- else -%}{{- m.content | trim -}}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
    "{%- for f in ns.pending -%}{{- " + _GEMMA4_RESULT + " -}}{%- endfor -%}"
    "{%- if not think -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"
    "{%- endif -%}"
)

KIMI = (
    "{%- if tools -%}{{- '<|im_system|>tool_declare<|im_middle|>' + tools | tojson + '<|im_end|>' -}}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages[0].role != 'system' -%}"
    "{{- '<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- '<|im_system|>system<|im_middle|>' + m.content + '<|im_end|>' -}}"
    "{%- elif m.role == 'user' -%}{{- '<|im_user|>user<|im_middle|>' + m.content + '<|im_end|>' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|im_system|>tool<|im_middle|>## Return of ' -}}{{- m.tool_call_id -}}{{- '\\n' + m.content + '<|im_end|>' -}}"
    "{%- else -%}"
    "{{- '<|im_assistant|>assistant<|im_middle|>' -}}"
    "{%- if loop.index0 > ns.last_user -%}{{- '<think>' + (m.reasoning_content or '') + '</think>' -}}"
    "{%- else -%}{{- '<think></think>' -}}{%- endif -%}"
    "{%- if m.content is string -%}{{- m.content -}}{%- endif -%}"
    "{%- if m.tool_calls -%}"
    "{{- '<|tool_calls_section_begin|>' -}}"
    "{%- for call in m.tool_calls -%}"
    "{{- '<|tool_call_begin|>' -}}{{- call.id -}}{{- '<|tool_call_argument_begin|>' -}}"
    "{{- call.function.arguments if call.function.arguments is string else call.function.arguments | tojson -}}"
    "{{- '<|tool_call_end|>' -}}"
    "{%- endfor -%}"
    "{{- '<|tool_calls_section_end|>' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}"
    "{%- if thinking is defined and not thinking -%}{{- '<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)

GEMMA2 = (
    "{{- bos_token -}}"
    "{%- if messages[0].role == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{{- '<start_of_turn>' + role + '\\n' + m.content | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

SMOL = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- if m.reasoning_content -%}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n' -}}{%- endif -%}"
    "{{- m.content + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


DEEPSEEK = (
    "{{- bos_token -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content -}}{%- endif -%}"
    "{%- set ns = namespace(in_tools=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<｜User｜>' + m.content -}}{%- set ns.in_tools = false -%}"
    "{%- elif m.role == 'assistant' and m.tool_calls -%}"
    "{%- if ns.in_tools -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- else -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
    "{%- if m.content -%}{{- m.content -}}{%- endif -%}"
    "{{- '<｜tool▁calls▁begin｜>' -}}"
    "{%- for call in m.tool_calls -%}"
    "{{- '<｜tool▁call▁begin｜>' + call.function.name + '<｜tool▁sep｜>' + call.function.arguments | tojson -}}"
    "{{- '<｜tool▁call▁end｜>' -}}"
    "{%- endfor -%}"
    "{{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}{%- set ns.in_tools = false -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if ns.in_tools -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- else -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
    "{{- m.content + '<｜end▁of▁sentence｜>' -}}{%- set ns.in_tools = false -%}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if not ns.in_tools -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- endif -%}{%- set ns.in_tools = true -%}"
    "{{- '<｜tool▁output▁begin｜>' + m.content + '<｜tool▁output▁end｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if ns.in_tools -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- else -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    template: str
    specials: tuple[str, ...]  # special tokens (the first two: bos, eos when given)
    bos: str | None
    eos: str
    added: tuple[str, ...] = ()  # added, not special (think and tool tags, as Qwen3's vocabulary has them)
    system: bool = True  # records may carry a system message
    reasoning: bool = False  # the template renders reasoning_content
    tools: bool = False  # the template renders tool calls and tool messages
    alternate: bool = False  # roles must alternate user/assistant
    trims: bool = False  # the template trims answers
    call_ids: bool = False  # calls are named by id: chatsft gives functions.NAME:IDX to calls without one
    stop: dict = field(default_factory=dict)  # what ends an answer: "turn" (the marker), "next" (role tag)


GEMMA4_SPECIALS = ("<bos>", "<eos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>",
                   "<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>", "<|think|>", '<|"|>')
THINK_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

FAMILIES = {
    "qwen3": Family(QWEN3, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), None, "<|im_end|>", THINK_TAGS,
                    reasoning=True, tools=True),
    "mistral": Family(MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "<s>", "</s>",
                      tools=True, trims=True),
    "phi3": Family(PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"), None,
                   "<|endoftext|>"),
    "glm": Family(GLM, ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                        "<|endoftext|>"), None, "<|endoftext|>",
                  THINK_TAGS + ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
                  reasoning=True, tools=True, trims=True),
    "llama31": Family(LLAMA31, ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eom_id|>", "<|end_of_text|>"), "<|begin_of_text|>", "<|eot_id|>",
                      tools=True, trims=True),
    "gemma4": Family(GEMMA4, GEMMA4_SPECIALS, "<bos>", "<eos>", reasoning=True, tools=True, trims=True),
    # Tool calls render; tool results do not (the template echoes them where the next answer is learned).
    "gemma4_echo": Family(GEMMA4_ECHO, GEMMA4_SPECIALS, "<bos>", "<eos>", reasoning=True, trims=True),
    "kimi": Family(KIMI, ("<|im_system|>", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>",
                          "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                          "<|tool_call_argument_begin|>", "<|tool_call_end|>", "[EOS]"), None, "<|im_end|>",
                   ("<think>", "</think>"), reasoning=True, tools=True, call_ids=True),
    "gemma2": Family(GEMMA2, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>",
                     alternate=True, trims=True),
    "deepseek": Family(DEEPSEEK, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                  "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                                  "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
                                  "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"),
                       "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", tools=True),
    "smol": Family(SMOL, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), None, "<|im_end|>", THINK_TAGS,
                   reasoning=True),
}

# Plain English for the BPE merges: words become tokens, while digits, CJK and emoji stay bytes
# (so a separator before them is a token of its own, the case the locator must learn).
CORPUS = [
    "Hello there! How are you today? I am fine, thank you. See you later.",
    "What is the weather like? It is sunny and warm in the city this morning.",
    "Please look up the route and tell me how far it is from the station.",
    "The answer is simple: add both numbers and check the result twice.",
    "system user assistant model tool think answer question reasoning the of and to in",
] * 20


def build(name: str, folder) -> "object":
    """A byte-level BPE with the family's markers as single tokens, and its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", *fam.specials]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=fam.eos, bos_token=fam.bos,
                                 additional_special_tokens=[s for s in fam.specials if s not in (fam.eos, fam.bos)])
    if fam.added:
        hf.add_tokens(list(fam.added))
    hf.chat_template = fam.template
    hf.save_pretrained(folder)
    return hf
