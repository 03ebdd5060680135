"""The model's kind is one object: what differs between decoder-only and encoder-decoder, asked of it."""

from __future__ import annotations

import pickle

import numpy as np

from chatsft.data.formats import ChatFormat, Seq2SeqFormat
from chatsft.data.render import Sample
from chatsft.data.schema import IGNORE, Row
from chatsft.model.kind import CAUSAL, SEQ2SEQ, as_kind, kind_of_config


def test_each_kind_answers_for_itself(tiny_llama_dir):
    from chatsft.config import load_config
    from chatsft.model import load_tokenizer

    tok = load_tokenizer(load_config(None, [f"model.name_or_path={tiny_llama_dir}"]).model)
    assert isinstance(CAUSAL.format("chatml", tok), ChatFormat) and isinstance(SEQ2SEQ.format("chatml", tok), Seq2SeqFormat)
    assert CAUSAL.auto().__name__ == "AutoModelForCausalLM" and SEQ2SEQ.auto().__name__ == "AutoModelForSeq2SeqLM"
    assert (CAUSAL.task_type().value, SEQ2SEQ.task_type().value) == ("CAUSAL_LM", "SEQ_2_SEQ_LM")
    assert kind_of_config({"is_encoder_decoder": True}) is SEQ2SEQ and kind_of_config({}) is CAUSAL
    assert as_kind("seq2seq") is SEQ2SEQ and pickle.loads(pickle.dumps(CAUSAL)) == CAUSAL  # travels in the plan

    # padding accounting: an encoder-decoder pads its targets too, and they count
    inputs = [{"n": 2, "tokens": 7, "lengths": [3, 4]}]
    labels = [{"n": 2, "tokens": 3, "lengths": [1, 2]}]
    assert CAUSAL.padding(inputs, labels, micro=2) == (7, 8)
    assert SEQ2SEQ.padding(inputs, labels, micro=2) == (10, 12)

    # batching: a causal batch is one padded sequence per row
    rows = [Row(np.array([5, 6, 7]), np.array([IGNORE, 6, 7])), Row(np.array([8]), np.array([8]))]
    b = CAUSAL.batcher(pad_id=0)(rows)
    assert b.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and (b.tokens, b.slots) == (4, 6)

    # previews: an encoder-decoder sample shows encoder text, then its target as learned
    s = Sample(np.array([1, 2], np.int32), np.array([3], np.int32), "a:1")
    assert CAUSAL.shown(s) is s
    joined = SEQ2SEQ.shown(s)
    assert joined.input_ids.tolist() == [1, 2, 3] and joined.labels.tolist() == [IGNORE, IGNORE, 3]
