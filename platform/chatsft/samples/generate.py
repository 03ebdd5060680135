"""Generate the sample conversations of the embedded default (seeded, reproducible).

The task: a user tells the assistant a few facts about themself, possibly adds
one later, and then asks about them. Every later answer depends on an earlier
turn, so a model only gets it right by reading the dialogue: session-level
context matters, and a tiny model can learn it on a CPU in minutes. The
held-out split uses the same generator with another seed; its final answers
are the generative task (exact match).

    python -m chatsft.samples.generate        # rewrites train.jsonl and heldout.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_SEED, HELDOUT_SEED = 1234, 5678
TRAIN_SIZE, HELDOUT_SIZE = 3000, 300

NAMES = ["Maya", "Omar", "Lena", "Ravi", "Sofia", "Tom", "Aiko", "Ben", "Chloe", "Diego", "Eva",
         "Femi", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Mei", "Nora", "Oscar", "Priya",
         "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yara"]
CITIES = ["Oslo", "Lima", "Cairo", "Paris", "Tokyo", "Delhi", "Quito", "Rome", "Seoul", "Dakar",
          "Lagos", "Berlin", "Madrid", "Hanoi", "Dublin", "Vienna", "Boston", "Sydney", "Nairobi",
          "Lisbon", "Prague", "Havana", "Denver", "Athens"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "teal",
          "brown", "gray"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "horse", "snake", "lizard"]
FOODS = ["pizza", "sushi", "tacos", "pasta", "curry", "salad", "soup", "dumplings", "pancakes",
         "noodles", "falafel", "paella"]
NUMBERS = [str(n) for n in range(2, 30)]

# slot -> (values, ways to state it, ways to ask, the answer)
SLOTS = {
    "name": (NAMES, ["My name is {v}.", "I am {v}.", "Call me {v}."],
             ["What is my name?", "Do you remember my name?", "Who am I?"], "Your name is {v}."),
    "city": (CITIES, ["I live in {v}.", "My home is in {v}.", "I am from {v}."],
             ["Where do I live?", "Which city do I live in?", "Where is my home?"], "You live in {v}."),
    "color": (COLORS, ["My favourite colour is {v}.", "I love the colour {v}.", "I like {v} best."],
              ["What is my favourite colour?", "Which colour do I like?", "What colour do I love?"],
              "Your favourite colour is {v}."),
    "pet": (PETS, ["I have a {v}.", "My pet is a {v}.", "I own a {v}."],
            ["What pet do I have?", "What animal is my pet?", "Which pet do I own?"], "You have a {v}."),
    "food": (FOODS, ["I love {v}.", "My favourite food is {v}.", "I could eat {v} every day."],
             ["What food do I love?", "What is my favourite food?", "What could I eat every day?"],
             "You love {v}."),
    "number": (NUMBERS, ["My lucky number is {v}.", "I was born on day {v} of the month.",
                         "My favourite number is {v}."],
               ["What is my lucky number?", "Which number is mine?", "What number did I tell you?"],
               "Your number is {v}."),
}
# Facts told and questions asked per dialogue. Recalling a fact from an earlier
# turn is what the tiny model has to learn, and it learns it in a sudden jump
# once it has seen enough recalls; dense dialogues (3-4 facts, 2-3 questions, the
# facts confirmed in the first answer) make the jump come early and reliably.
# Measured with benchmarks/learnability.py (batch 32, lr 1e-2, 360 steps):
# the former 2-4 facts / 1-3 questions left three seeds of four at 0.29-0.32
# held-out pass@1 after ~470 steps; 3-4 / 2-3 gave 0.62-0.84 (5 seeds); with the
# confirmation 0.74-0.86 (3 seeds).
FACTS, QUESTIONS = (3, 4), (2, 3)
# How the assistant confirms each fact in its first answer (the name is greeted
# instead). Copying the facts right away gives every dialogue several easy recalls
# besides the questions, which makes the model learn recall sooner and more surely.
ECHOES = {"name": None, "city": "you live in {v}", "color": "you like {v}", "pet": "you have a {v}",
          "food": "you love {v}", "number": "your number is {v}"}
GREETINGS = ["Hi!", "Hello.", "Hey there.", "Good morning.", ""]
SYSTEMS = ["You are a helpful assistant with a good memory.", "Answer briefly and remember what the user says."]
ADD_ONS = ["By the way, {s}", "Oh, and {s}", "One more thing: {s}"]


def conversation(rng: random.Random) -> dict:
    slots = rng.sample(sorted(SLOTS), k=rng.randint(*FACTS))
    facts = {s: rng.choice(SLOTS[s][0]) for s in slots}
    late = slots.pop() if len(slots) > 2 and rng.random() < 0.4 else None  # told in a later turn

    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    intro = " ".join([rng.choice(GREETINGS)] + [rng.choice(SLOTS[s][1]).format(v=facts[s]) for s in slots])
    messages.append({"role": "user", "content": intro.strip()})
    reply = f"Nice to meet you, {facts['name']}!" if "name" in slots else "Nice to meet you!"
    echo = [ECHOES[s].format(v=facts[s]) for s in slots if ECHOES[s]]
    if echo:
        reply += " So " + ", ".join(echo[:-1]) + (" and " if len(echo) > 1 else "") + echo[-1] + "."
    messages.append({"role": "assistant", "content": reply})

    known = list(slots)
    asks = rng.randint(*QUESTIONS)
    for turn in range(asks):
        if late is not None and turn == 0:
            said = rng.choice(SLOTS[late][1]).format(v=facts[late])
            messages.append({"role": "user", "content": rng.choice(ADD_ONS).format(s=said[0].lower() + said[1:])})
            messages.append({"role": "assistant", "content": "Noted."})
            known.append(late)
        slot = rng.choice(known)
        messages.append({"role": "user", "content": rng.choice(SLOTS[slot][2])})
        messages.append({"role": "assistant", "content": SLOTS[slot][3].format(v=facts[slot])})
    return {"messages": messages}


def lines(seed: int, n: int, exclude: frozenset = frozenset()) -> list[str]:
    """n distinct JSONL lines, none of them in `exclude` (so held-out never leaks into train)."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        line = json.dumps(conversation(rng), ensure_ascii=False)
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def main() -> None:
    train = lines(TRAIN_SEED, TRAIN_SIZE)
    heldout = lines(HELDOUT_SEED, HELDOUT_SIZE, exclude=frozenset(train))
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (HERE / name).write_text("".join(r + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
