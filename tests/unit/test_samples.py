import json

from chatsft.data.conversation import parse_line
from chatsft.sources import read_local
from chatsft.samples import generate


def test_shipped_samples_are_what_the_seeded_generator_writes():
    train = generate.lines(generate.TRAIN_SEED, generate.TRAIN_SIZE)
    heldout = generate.lines(generate.HELDOUT_SEED, generate.HELDOUT_SIZE, exclude=frozenset(train))
    assert (generate.HERE / "train.jsonl").read_text(encoding="utf-8").splitlines() == train
    assert (generate.HERE / "heldout.jsonl").read_text(encoding="utf-8").splitlines() == heldout
    assert not set(train) & set(heldout)


def test_samples_are_valid_multi_turn_and_depend_on_earlier_turns():
    convs = list(read_local("chatsft://samples/train.jsonl"))
    assert len(convs) >= 2000 and all(not isinstance(c, Exception) for c in convs)
    for c in convs[:200]:
        answers = [m.text for m in c.messages if m.role == "assistant"]
        assert len(answers) >= 2
        # the final answer's fact was stated by the user earlier in the dialogue
        fact = answers[-1].rstrip(".").split()[-1]
        told = " ".join(m.text for m in c.messages[:-2] if m.role == "user")
        assert fact in told
    assert parse_line(json.dumps(convs[0].to_record())).messages == convs[0].messages
