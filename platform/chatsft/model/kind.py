"""The kind of model a run trains, as one object: decoder-only (`CAUSAL`) or encoder-decoder
(`SEQ2SEQ`). Resolved once, in the RunPlan (`resolve_kind`); every other module asks the object
for what differs, and none asks which kind it is:

- `format(...)`: how a conversation is rendered and a prompt is tokenized (data/formats.py);
- `batcher(pad_id, model)`: rows -> the padded tensors of a micro-batch (model/batch.py), with
  the decoder's start shift for an encoder-decoder;
- `auto_class`, `peft_task`, `mlflow_task`: the transformers Auto class, PEFT's task type and
  MLflow's pipeline task;
- `padding(inputs, labels, micro)`: the tokens and padded slots of prepared rows (stats.json);
- `shown(sample)`: a sample as one line of text (previews);
- `decoder_only`: one sequence read through a chat template (what `chatsft template` and the
  per-turn weights describe; generation pads prompts on the left) or an encoder text and a
  decoder target.

The objects are plain frozen data: they travel to Ray workers inside the plan.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from chatsft.builtin import resolve
from chatsft.errors import UserError, one_line


@dataclass(frozen=True)
class ModelKind:
    """What follows from a model's kind. Two instances exist, CAUSAL and SEQ2SEQ."""

    name: str  # "causal" or "seq2seq": model.kind's values, the fingerprint's and resume's record
    auto_class: str  # the transformers class that builds the model with its LM head
    peft_task: str  # peft.TaskType's name
    mlflow_task: str  # the transformers pipeline task MLflow logs the model under
    decoder_only: bool  # one sequence, rendered by a chat template (else encoder text + decoder target)

    def auto(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    def task_type(self) -> Any:
        from peft import TaskType

        return TaskType[self.peft_task]

    def format(self, template: Any, tokenizer: Any, think: Any = None, template_kwargs: Optional[dict] = None):
        """The data/formats.py Format of this kind, bound to `tokenizer`: a chat template (data.template,
        data.think, data.chat_template_kwargs) for a decoder-only model, input/target pairs otherwise."""
        from chatsft.data.formats import ChatFormat, Seq2SeqFormat
        from chatsft.data.templates import get_template

        if not self.decoder_only:
            return Seq2SeqFormat(tokenizer)
        return ChatFormat(get_template(template, tokenizer, think, template_kwargs), tokenizer)

    def batcher(self, pad_id: int, model: Any = None, multiple: int = 1) -> Callable[[Sequence[Any]], Any]:
        """rows -> model/batch.py's Batch, right-padded with `pad_id` (decoder-only rows to a multiple of
        `multiple`: the parts of sequence parallelism); an encoder-decoder's decoder reads the labels
        through `model`'s own start shift (the plan refuses sequence parallelism for it)."""
        from chatsft.model import batch

        if self.decoder_only:
            return functools.partial(batch.collate, pad_id=pad_id, multiple=multiple)
        return functools.partial(batch.collate_pairs, pad_id=pad_id, decoder_start=batch.decoder_start(model))

    def padding(self, inputs: Sequence[dict], labels: Sequence[dict], micro: int) -> tuple[int, int]:
        """(tokens, padded slots) of rows read in stored order in micro-batches of `micro`, from the pad
        summaries of their inputs and labels: an encoder-decoder pads both sequences, and both count."""
        from chatsft.data.stats import padded_slots_of_runs

        parts = (inputs,) if self.decoder_only else (inputs, labels)
        return (sum(p["tokens"] for part in parts for p in part),
                sum(padded_slots_of_runs(part, micro) for part in parts))

    def shown(self, sample: Any) -> Any:
        """A sample as one line of text (data/preview.py): an encoder-decoder's encoder text as context
        followed by its decoder target as learned."""
        from chatsft.data.preview import joined

        return sample if self.decoder_only else joined(sample)


CAUSAL = ModelKind("causal", "AutoModelForCausalLM", "CAUSAL_LM", "text-generation", decoder_only=True)
SEQ2SEQ = ModelKind("seq2seq", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", "text2text-generation", decoder_only=False)
KINDS = {k.name: k for k in (CAUSAL, SEQ2SEQ)}


def as_kind(kind: Union[ModelKind, str]) -> ModelKind:
    """A ModelKind, also from its name (model.kind's values)."""
    return kind if isinstance(kind, ModelKind) else KINDS[kind]


def kind_of_config(conf: Any) -> ModelKind:
    """The kind of a transformers config (an object or config.json's dict)."""
    get = conf.get if isinstance(conf, dict) else functools.partial(getattr, conf)
    return SEQ2SEQ if get("is_encoder_decoder", False) else CAUSAL


def kind_of_model(model: Any) -> ModelKind:
    """The kind of a loaded model (Hugging Face, PEFT or DeepSpeed-wrapped): evaluation takes any
    model folder, whose kind need not be the run's."""
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP, DeepSpeed
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return kind_of_config(getattr(model, "config", None) or {})


def resolve_kind(model_cfg: Any) -> ModelKind:
    """From model.kind, else from the model's config.json."""
    if model_cfg.kind != "auto":
        return KINDS[model_cfg.kind]
    path = resolve(model_cfg.name_or_path)
    local = os.path.join(path, "config.json")
    if os.path.isdir(path):
        if not os.path.exists(local):
            raise UserError(f"model.name_or_path={model_cfg.name_or_path}: the folder has no config.json "
                            "(a tokenizer alone?), so the kind of model is unknown; point it at a model "
                            "folder, or set model.kind to causal or seq2seq")
        try:
            with open(local, encoding="utf-8") as f:
                conf = json.load(f)
        except ValueError as e:
            raise UserError(f"model.name_or_path={model_cfg.name_or_path}: {local} is not valid JSON "
                            f"({one_line(e)})") from None
        if "model_type" not in conf:
            from chatsft.model.check import missing_model_type

            raise UserError(missing_model_type(model_cfg.name_or_path, path))
        return kind_of_config(conf)
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                          revision=model_cfg.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path={model_cfg.name_or_path}: cannot read its config to tell the "
                        f"kind of model ({one_line(e)}); set model.kind to causal or seq2seq, or fix the "
                        "path") from None
    return kind_of_config(conf)
