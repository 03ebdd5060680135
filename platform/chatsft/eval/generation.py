"""Batched generation with a KV cache, and next-token choice scoring.

Decoder-only models run our own loop: prompts are left-padded so every row's
next token is in the last column, positions come from the attention mask (so
padding shifts nothing), and each step feeds one token per row through the
cache. Owning the loop keeps stopping exact (the template's end-of-turn token
and EOS end a row; the stop token itself is not part of the answer) and works
for any module that takes `input_ids, attention_mask, position_ids,
past_key_values, use_cache` (a DeepSpeed engine, a LoRA model). Encoder-decoder
models, and PEFT prompt-learning models whose forward cannot be stepped through
a cache, go through `model.generate` and get the same cutting at stop tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch

from chatsft.model.kind import kind_of_model


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    num_samples: int = 1  # completions per prompt
    batch_size: int = 16  # prompts per forward batch
    seed: int = 0

    @classmethod
    def from_config(cls, eval_cfg: Any, seed: int = 0) -> "GenerationOptions":
        return cls(eval_cfg.max_new_tokens, eval_cfg.temperature, eval_cfg.top_k, eval_cfg.num_samples,
                   eval_cfg.batch_size, seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside a DeepSpeed engine or DDP wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def model_device(model: Any) -> torch.device:
    for p in unwrap(model).parameters():
        return p.device
    return torch.device("cpu")


def _steps_through_cache(model: Any) -> bool:
    # PEFT prompt tuning / p-tuning prepend virtual tokens inside forward on every
    # call, so stepping through the cache would prepend them again.
    peft_config = getattr(unwrap(model), "active_peft_config", None)
    return not bool(getattr(peft_config, "is_prompt_learning", False))


def cut_at_stop(ids: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """The tokens before the first stop token (the stop token is not part of the answer)."""
    stops = set(stop_ids)
    out = []
    for t in ids:
        if t in stops:
            break
        out.append(int(t))
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """(input_ids, attention_mask, position_ids), right-aligned so the last column is every row's last token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("cannot generate from an empty prompt")
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """(ids, mask) padded on the right: encoder inputs and loss batches."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def pick_next(logits: torch.Tensor, opts: GenerationOptions, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Greedy argmax, or a sample at `temperature` from the `top_k` most likely tokens."""
    logits = logits.float()
    if opts.greedy:
        return logits.argmax(-1)
    logits = logits / opts.temperature
    if 0 < opts.top_k < logits.size(-1):
        kth = torch.topk(logits, opts.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _generate_causal(model: Any, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
                     opts: GenerationOptions, generator: Optional[torch.Generator]) -> list[list[int]]:
    device = model_device(model)
    ids, mask, positions = left_pad(prompts, pad_id, device)
    stops = torch.as_tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for step in range(opts.max_new_tokens):
        tok = pick_next(out.logits[:, -1, :], opts, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        generated.append(tok)
        done |= torch.isin(tok, stops)
        if bool(done.all()) or step == opts.max_new_tokens - 1:
            break
        # Finished rows keep stepping (their tokens are cut below); a one-column
        # mask extension keeps every row's cache aligned.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_pos = next_pos + 1
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    return [cut_at_stop(r, stop_ids) for r in rows]


@torch.no_grad()
def _generate_hf(model: Any, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
                 opts: GenerationOptions) -> list[list[int]]:
    """model.generate for encoder-decoder (and prompt-learning) models; same stopping rules."""
    inner = unwrap(model)
    device = model_device(model)
    encoder = not kind_of_model(inner).decoder_only
    if encoder:  # the encoder input is right-padded like in training
        ids, mask = right_pad(prompts, pad_id, device)
    else:
        ids, mask, _ = left_pad(prompts, pad_id, device)
    # synced_gpus=False: rank 0 generates alone (a sharding engine gathered the weights first);
    # transformers would otherwise all-reduce every token for an FSDP-managed model
    kwargs = dict(max_new_tokens=opts.max_new_tokens, eos_token_id=sorted(set(stop_ids)), pad_token_id=pad_id,
                  synced_gpus=False)
    if opts.greedy:
        kwargs.update(do_sample=False, top_k=None, top_p=None, temperature=None)
    else:
        kwargs.update(do_sample=True, temperature=opts.temperature, top_k=opts.top_k or None, top_p=None)
    seqs = inner.generate(input_ids=ids, attention_mask=mask, **kwargs)
    # Encoder-decoder output starts with the decoder start token; decoder-only repeats the prompt.
    new = seqs[:, 1:] if encoder else seqs[:, ids.size(1):]
    return [cut_at_stop(r, stop_ids) for r in new.tolist()]


def generate(model: Any, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
             opts: GenerationOptions) -> list[list[list[int]]]:
    """`opts.num_samples` completions (token ids, stop token excluded) for every prompt, in prompt order.

    Prompts are batched by length to waste little padding; sampling draws from a
    private generator seeded with `opts.seed`, so evaluation never moves the
    caller's (the trainer's) random state.
    """
    n = 1 if opts.greedy else opts.num_samples  # greedy samples are all the same
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows = [i for i in order for _ in range(n)]
    results: list[list[list[int]]] = [[] for _ in prompts]
    own_loop = kind_of_model(model).decoder_only and _steps_through_cache(model)
    device = model_device(model)
    generator = None
    if not opts.greedy and own_loop:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    fork = nullcontext()
    if not opts.greedy and not own_loop:  # model.generate samples from the global RNG
        fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    was_training = unwrap(model).training
    unwrap(model).eval()
    try:
        with fork:
            if not own_loop and not opts.greedy:
                torch.manual_seed(opts.seed)
            step = max(1, opts.batch_size) * n
            for start in range(0, len(rows), step):
                chunk = rows[start: start + step]
                batch = [prompts[i] for i in chunk]
                if own_loop:
                    outs = _generate_causal(model, batch, stop_ids, pad_id, opts, generator)
                else:
                    outs = _generate_hf(model, batch, stop_ids, pad_id, opts)
                for i, o in zip(chunk, outs):
                    results[i].append(o)
    finally:
        unwrap(model).train(was_training)
    if n != opts.num_samples:
        results = [r * opts.num_samples for r in results]
    return results


@torch.no_grad()
def choose(model: Any, prompts: Sequence[Sequence[int]], choice_ids: Sequence[Sequence[int]], pad_id: int,
           batch_size: int = 16, decoder_start_id: Optional[int] = None) -> list[int]:
    """For each prompt, the index of the choice whose token has the highest next-token logit.

    Only the choices' tokens compete: a model that would rather say something else
    still picks one of the labels.
    """
    device = model_device(model)
    encoder = not kind_of_model(model).decoder_only
    if encoder and decoder_start_id is None:
        decoder_start_id = unwrap(model).config.decoder_start_token_id
    picks: list[int] = [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    was_training = unwrap(model).training
    unwrap(model).eval()
    try:
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start: start + batch_size]
            if encoder:
                ids, mask = right_pad([prompts[i] for i in chunk], pad_id, device)
                start_tok = torch.full((len(chunk), 1), decoder_start_id, dtype=torch.long, device=device)
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start_tok).logits[:, 0]
            else:
                ids, mask, positions = left_pad([prompts[i] for i in chunk], pad_id, device)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            for row, i in enumerate(chunk):
                allowed = torch.as_tensor(list(choice_ids[i]), dtype=torch.long, device=device)
                picks[i] = int(logits[row].float().index_select(0, allowed).argmax())
    finally:
        unwrap(model).train(was_training)
    return picks
