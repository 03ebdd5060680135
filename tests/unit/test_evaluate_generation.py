"""Generation and choice scoring on hand-set models: stopping, batching, padding, sampling, MC argmax."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from chatsft.config import load_config
from chatsft.data.conversation import Message
from chatsft.model.kind import CAUSAL
from chatsft.eval.generation import GenerationOptions, choose, cut_at_stop, generate, pick_next
from chatsft.eval.tasks import LETTERS, choice_token_ids

VOCAB = 64
PAD, EOS, EOT = 0, 1, 2


class ScriptModel(torch.nn.Module):
    """Emits a fixed script per prompt, whatever the padding and batching.

    The script is chosen by the prompt's first real token; the k-th generated
    token is script[k]. The model also checks that positions count real tokens
    only (left padding must not shift them) and that the cache carries every row.
    """

    def __init__(self, scripts: dict[int, list[int]]):
        super().__init__()
        self.scripts = scripts
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **_):
        self.calls += 1
        if past_key_values is None:  # the prompt
            real = attention_mask.bool()
            first = [int(row[m][0]) for row, m in zip(input_ids, real)]
            lengths = real.sum(-1)
            assert torch.equal(position_ids[:, -1], lengths - 1), "positions must count real tokens"
            state = {"first": first, "generated": 0, "next_pos": lengths.clone()}
        else:
            state = past_key_values
            assert input_ids.shape[1] == 1, "one new token per step through the cache"
            assert torch.equal(position_ids[:, -1], state["next_pos"]), "positions continue after the prompt"
            state = {**state, "generated": state["generated"] + 1, "next_pos": state["next_pos"] + 1}
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], VOCAB), -10.0)
        for row, key in enumerate(state["first"]):
            script = self.scripts[key]
            k = state["generated"]
            logits[row, -1, script[k] if k < len(script) else 3] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=state)


SCRIPTS = {
    5: [20, 21, EOT, 22, 23],  # end-of-turn in the middle: later tokens must not appear
    6: [30, EOS, 31],  # EOS stops too
    7: [40, 41, 42, 43, 44, 45, 46, 47, 48, 49],  # never stops: the new-token limit cuts it
    8: [EOT, 50],  # an empty answer
}
PROMPTS = [[5, 9, 9], [6], [7, 8, 8, 8, 8, 8], [8, 9]]
WANT = [[20, 21], [30], [40, 41, 42, 43], []]


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_generation_stops_at_end_of_turn_batched(batch_size):
    model = ScriptModel(SCRIPTS)
    opts = GenerationOptions(max_new_tokens=4, batch_size=batch_size)
    out = generate(model, PROMPTS, [EOT, EOS], PAD, opts)
    assert out == [[w] for w in WANT]


def test_generation_stops_early_when_every_row_is_done():
    model = ScriptModel(SCRIPTS)
    generate(model, [[5, 1], [6, 2, 2]], [EOT, EOS], PAD, GenerationOptions(max_new_tokens=50, batch_size=2))
    assert model.calls == 3  # prompt + 2 steps: row 0 stops at its 3rd token, row 1 at its 2nd


def test_generation_limit_and_samples_per_prompt():
    model = ScriptModel(SCRIPTS)
    out = generate(model, [[7]], [EOT, EOS], PAD, GenerationOptions(max_new_tokens=7, num_samples=3))
    assert out == [[[40, 41, 42, 43, 44, 45, 46]] * 3]


def test_cut_at_stop():
    assert cut_at_stop([4, 5, 2, 6, 1], [1, 2]) == [4, 5]
    assert cut_at_stop([4, 5], [1, 2]) == [4, 5]
    assert cut_at_stop([1, 4], [1]) == []


class CoinModel(torch.nn.Module):
    """First token: 10 or 11 with equal probability (12 much less likely); then end-of-turn."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, **_):
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], VOCAB), -30.0)
        if step == 0:
            logits[:, -1, 10] = 0.0
            logits[:, -1, 11] = 0.0
            logits[:, -1, 12] = -1.0
        else:
            logits[:, -1, EOT] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=step)


def test_sampling_is_seeded_and_top_k_limits_choices():
    model = CoinModel()
    opts = GenerationOptions(max_new_tokens=3, temperature=1.0, top_k=2, num_samples=40, batch_size=2, seed=3)
    state = torch.random.get_rng_state()
    a = generate(model, [[4], [5, 6]], [EOT], PAD, opts)
    assert torch.equal(torch.random.get_rng_state(), state), "evaluation must not move the global RNG"
    b = generate(model, [[4], [5, 6]], [EOT], PAD, opts)
    assert a == b  # same seed, same samples
    firsts = [o[0] for per in a for o in per]
    assert set(firsts) == {10, 11}  # top_k=2 never samples token 12
    assert all(len(o) == 1 for per in a for o in per)
    c = generate(model, [[4], [5, 6]], [EOT], PAD, GenerationOptions(3, 1.0, 0, 40, 2, seed=4))
    assert c != a  # another seed, other draws
    greedy = generate(model, [[4]], [EOT], PAD, GenerationOptions(3, 0.0, 0, 5, 2))
    assert greedy == [[[10]] * 5]  # greedy n samples are n copies of the argmax


def test_pick_next_top_k_one_is_greedy():
    logits = torch.randn(6, VOCAB)
    g = torch.Generator().manual_seed(0)
    opts = GenerationOptions(temperature=2.0, top_k=1)
    assert torch.equal(pick_next(logits, opts, g), logits.argmax(-1))


# ------------------------------------------------------------------ multiple choice


class FixedLogits(torch.nn.Module):
    """Next-token logits looked up by the prompt's real tokens (padding stripped by the mask)."""

    def __init__(self, table: dict[tuple, torch.Tensor]):
        super().__init__()
        self.table = table
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.batch_sizes = []

    def forward(self, input_ids, attention_mask=None, **_):
        self.batch_sizes.append(input_ids.shape[0])
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], VOCAB)
        for row, (ids, m) in enumerate(zip(input_ids, attention_mask.bool())):
            logits[row, -1] = self.table[tuple(ids[m].tolist())]
        return SimpleNamespace(logits=logits)


def _logits(**at: float) -> torch.Tensor:
    v = torch.zeros(VOCAB)
    for tok, value in at.items():
        v[int(tok[1:])] = value
    return v


def test_choose_restricts_argmax_to_choice_tokens():
    choices = (30, 31, 32, 33)  # A, B, C, D
    prompts = [[4, 5], [6], [7, 7, 7], [8, 9, 10, 11]]
    table = {
        (4, 5): _logits(t31=2.0, t30=1.0),  # B
        (6,): _logits(t9=50.0, t33=0.5, t32=0.4),  # a non-choice token is highest overall: still D
        (7, 7, 7): _logits(t30=-1.0, t31=-3.0, t32=-2.0, t33=-4.0, t40=9.0),  # A: all choices negative
        (8, 9, 10, 11): _logits(t32=0.1),  # C
    }
    model = FixedLogits(table)
    picks = choose(model, prompts, [choices] * 4, PAD, batch_size=3)
    assert picks == [1, 3, 0, 2]
    assert sorted(model.batch_sizes) == [1, 3]  # batched: 4 prompts in batches of at most 3


def test_multiple_choice_task_accuracy_on_hand_set_logits(tmp_path, tokenizer):
    """End to end through evaluate_model: MC JSONL -> chat-template prompts -> restricted argmax -> accuracy."""
    from chatsft.eval.evaluate import evaluate_model

    items = [
        {"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": "B"},
        {"question": "Capital of Peru?", "choices": ["Lima", "Quito"], "answer": 0},
        {"question": "Colour of the sky?", "choices": ["green", "blue", "red", "pink"], "answer": "b"},
    ]
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    cfg = load_config(None, [f"eval.tasks=[mc:{path}]", "eval.batch_size=2"])
    fmt = CAUSAL.format("chatml", tokenizer)
    letters = choice_token_ids(LETTERS[:4], tokenizer)
    vocab = len(tokenizer)
    global VOCAB
    old, VOCAB = VOCAB, vocab
    try:
        table = {}
        picked = ["B", "B", "D"]  # right, wrong, wrong
        for item, pick in zip(items, picked):
            text = "\n".join([item["question"]] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])]
                             + ["Answer:"])
            ids = fmt.prompt_ids((Message("user", text),))
            assert tokenizer.decode(ids).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
            logits = torch.zeros(vocab)
            logits[letters[LETTERS.index(pick)]] = 3.0
            logits[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 10.0  # not a choice: ignored
            table[tuple(ids)] = logits
        metrics = evaluate_model(FixedLogits(table), tokenizer, cfg)
    finally:
        VOCAB = old
    assert metrics == {"mc:quiz/accuracy": pytest.approx(1 / 3), "mc:quiz/examples": 3.0}


def test_choice_tokens_must_be_distinct(tokenizer):
    from chatsft.errors import UserError

    assert len(set(choice_token_ids(LETTERS[:5], tokenizer))) == 5
    with pytest.raises(UserError, match="distinct"):
        choice_token_ids(["Apple", "Avocado"], tokenizer)


# ------------------------------------------------------- generative task, custom checker


def test_custom_checker_by_dotted_path(tmp_path, tokenizer, monkeypatch):
    """chat:PATH@module:function scores with the user's function; the answer is cut at <|im_end|>."""
    from chatsft.eval.evaluate import evaluate_model

    (tmp_path / "mychecks.py").write_text(
        "def contains(output, reference):\n    return reference.split()[-1].strip('.') in output\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mychecks", None)
    dialogues = [
        [("user", "I have a cat."), ("assistant", "Noted."), ("user", "Which pet?"), ("assistant", "You have a cat.")],
        [("user", "My number is 7."), ("assistant", "Noted."), ("user", "Which number?"),
         ("assistant", "Your number is 7.")],
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in d]}) + "\n"
                            for d in dialogues))
    fmt = CAUSAL.format("chatml", tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = ["it is a cat, surely", "Your number is 7."]  # loose but right; exact
    scripts, keys = {}, []
    for d, reply in zip(dialogues, replies):
        ids = fmt.prompt_ids(tuple(Message(r, c) for r, c in d[:-1]))
        keys.append(ids[0])
        scripts[tuple(ids)] = tokenizer(reply, add_special_tokens=False)["input_ids"] + [eot] + \
            tokenizer(" junk after the end", add_special_tokens=False)["input_ids"]

    class PromptScript(ScriptModel):
        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kw):
            if past_key_values is None:
                self.current = [tuple(r[m].tolist()) for r, m in zip(input_ids, attention_mask.bool())]
                self.scripts = {i: scripts[p] for i, p in enumerate(self.current)}
                input_ids = input_ids.clone()
                for i, m in enumerate(attention_mask.bool()):
                    input_ids[i, m.nonzero()[0, 0]] = i  # first real token names the row's script
            out = super().forward(input_ids, attention_mask, position_ids, past_key_values)
            return out

    global VOCAB
    old, VOCAB = VOCAB, len(tokenizer)
    try:
        runs = []
        cfg = load_config(None, [f"eval.tasks=[chat:{path}@mychecks:contains, chat:{path}]", "eval.batch_size=1"])
        with pytest.raises(Exception, match="two tasks are named"):
            evaluate_model(PromptScript({}), tokenizer, cfg)
        cfg = load_config(None, [f"eval.tasks=[chat:{path}@mychecks:contains]", "eval.batch_size=2"])
        metrics = evaluate_model(PromptScript({}), tokenizer, cfg, runs=runs)
        exact = evaluate_model(PromptScript({}), tokenizer, load_config(None, [f"eval.tasks=[chat:{path}]"]),
                               )
    finally:
        VOCAB = old
    assert runs[0].outputs == [["it is a cat, surely"], ["Your number is 7."]]  # nothing after <|im_end|>
    assert metrics["chat:qa/pass_at_1"] == 1.0
    assert exact["chat:qa/pass_at_1"] == 0.5  # exact match after normalization: only the second


def test_checker_spec_errors():
    from chatsft.errors import UserError
    from chatsft.eval.tasks import load_checker, task_from_spec

    with pytest.raises(UserError, match="expected module:function"):
        load_checker("nocolon")
    with pytest.raises(UserError, match="cannot import"):
        load_checker("no_such_module_xyz:f")
    with pytest.raises(UserError, match="has no function"):
        load_checker("json:no_such_function")
    assert load_checker("json:dumps") is json.dumps
    with pytest.raises(UserError, match="unknown task"):
        task_from_spec("bogus", [])
    with pytest.raises(UserError, match="data.eval"):
        task_from_spec("heldout", [])
    with pytest.raises(UserError, match="no such file"):
        task_from_spec("chat:/nope/missing.jsonl", [])
