"""The hf renderer remembers the sandbox's attribute decisions: the sandbox must refuse the same
things afterwards, and the render must equal apply_chat_template."""

import jinja2
import pytest

from chatsft.data.hf import Jinja

SAFE = ("{% for m in messages %}{{ m.role | upper }}:{{ m.content.strip() }}{{ loop.index0 }}\n{% endfor %}")


@pytest.mark.parametrize("escape", [
    "{{ messages.__class__ }}",  # a dunder of a list
    "{{ ''.__class__.__mro__ }}",  # a dunder of a str, asked after str methods were allowed
    "{{ messages.append(1) }}",  # a mutating method of a known mutable type
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_the_sandbox_still_refuses_after_safe_attributes_were_remembered(tokenizer, escape):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = SAFE + escape
    r = Jinja(tok)
    msgs = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "yo"}]
    for _ in range(2):  # refused the first time and when the decisions are remembered
        try:
            out = r.render(msgs, None, False)
        except jinja2.exceptions.SecurityError:
            continue
        assert out == "USER:hi0\nASSISTANT:yo1\n", out  # an unsafe attribute renders as nothing
    assert msgs[0] == {"role": "user", "content": "  hi  "}
    tok.chat_template = SAFE
    ok = Jinja(tok)
    for _ in range(2):  # the second render answers from what the first remembered
        assert ok.render(msgs, None, False) == tok.apply_chat_template(msgs, tokenize=False) == "USER:hi0\nASSISTANT:yo1\n"
