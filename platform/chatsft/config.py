"""One typed config tree, loaded from YAML with dotted overrides.

Every key has its default here, next to a line saying what it does; YAML files
only state what differs. Loading is strict: an unknown key or a value of the
wrong type stops with the key's full dotted path, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from chatsft import storage
from chatsft.data.options import Organization, Template, Think, ToolArguments, TrainOn, Truncation
from chatsft.errors import ConfigError  # noqa: F401  (raised here, defined with the others)


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = None):
    """A field with its documentation, kept in `metadata["doc"]` for `chatsft keys`."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# --------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    name: str = doc("chatsft", "Run name: MLflow run name, Ray Train run name and the checkpoint folder "
                    "<output_dir>/<name>/. The output_dir's model/ and result.json belong to the first name that "
                    "writes them; another name writes its own into <output_dir>/<name>/.")
    output_dir: str = doc(
        "runs/chatsft",
        "Where prepared data, checkpoints, the exported model and the local MLflow "
        "store go. A local path, or a URI (s3://, gs://) for multi-node clusters.",
    )
    shared_storage: bool = doc(
        False,
        "Declare that a local output_dir is on storage every node sees (NFS). "
        "A local, unshared path is refused on a multi-node cluster.",
    )
    seed: int = doc(0, "Seeds data shuffling, mixture sampling, model init and training RNG.")


# ------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    name_or_path: str = doc(
        "builtin:tiny-llama",
        "Hugging Face model id or local folder; `builtin:tiny-llama` / `builtin:tiny-t5` "
        "build the tiny offline models of the embedded default.",
    )
    tokenizer: Optional[str] = doc(None, "Tokenizer id or folder if not the model's own.")
    kind: Literal["auto", "causal", "seq2seq"] = doc(
        "auto", "Decoder-only or encoder-decoder; `auto` reads config.json."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "auto", "Weights dtype when loading; `auto` follows train.precision."
    )
    trust_remote_code: bool = doc(False, "Run code shipped with the model (off unless you trust it).")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = doc(
        "auto", "Attention kernel; `auto`: flash_attention_2 on GPU if installed, else sdpa."
    )
    revision: Optional[str] = doc(None, "Hub revision (branch, tag or commit).")


# -------------------------------------------------------------------------- data


@dataclass
class Source:
    """One source of a mixture: a path, glob or URI of JSONL or Parquet files, and its sampling weight."""

    path: str = doc("", "Local path, glob, folder, or pyarrow/fsspec URI (s3://...) of JSONL or Parquet files; a "
                    "local path is made absolute when the config loads (against the working folder).")
    format: Literal["auto", "jsonl", "parquet"] = doc(
        "auto",
        "File format: auto (by extension: .jsonl is JSON lines, .parquet is Parquet with a "
        "`messages` column; any other is refused), jsonl or parquet (every file of the source).",
    )
    weight: float = doc(
        1.0,
        "Sampling weight: 2.0 repeats every record twice, 0.5 keeps a seeded half; "
        "fractional parts are sampled deterministically from run.seed.",
    )

    @classmethod
    def _from_scalar(cls, value: Any) -> "Source":
        if not isinstance(value, str):
            raise TypeError("expected a path string or {path, weight, format}")
        return cls(path=value)

    def _validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path: must not be empty")
        if self.weight < 0:
            raise ConfigError(f"{where}.weight: must be >= 0, got {self.weight}")
        # Absolute from here on: Ray tasks and workers run in other folders, and a resume started
        # from another folder (or spelling the same file absolute) must name the same file.
        if not storage.is_uri(self.path):
            self.path = storage.absolute(self.path)


@dataclass
class DataConfig:
    train: list[Source] = doc(
        factory=lambda: [Source("chatsft://samples/train.jsonl")],
        text="Training sources: a path, a glob, a folder, or a list of {path, weight, format}; JSONL "
        "(.jsonl) or Parquet with a `messages` column (.parquet); format: auto (by extension), jsonl, parquet. "
        "`chatsft://samples/...` names the sample data shipped with the package.",
    )
    eval: list[Source] = doc(
        factory=list, text="Held-out sources; empty: carve eval_fraction out of train."
    )
    eval_fraction: float = doc(
        0.0, "Fraction of train records held out for eval (seeded) when data.eval is empty."
    )
    template: Template = doc(Template.CHATML, "Chat format: chatml, llama3, chatglm2, special, hf.")
    organization: Organization = doc(Organization.SESSION, "session or split_turn samples.")
    train_on: TrainOn = doc(TrainOn.ALL_ASSISTANT, "Masking policy: which tokens carry loss.")
    think: Optional[Think] = doc(
        None, "Think blocks: learn, mask_empty or drop_history; unset: what the chat template does at "
        "inference (`chatsft template` says which)."
    )
    chat_template_kwargs: dict[str, Any] = doc(
        factory=dict, text="data.template=hf: extra variables for the template, as apply_chat_template(**kwargs) "
        "and vLLM's chat_template_kwargs take them (e.g. {enable_thinking: true}); serve with the same ones."
    )
    tool_arguments: ToolArguments = doc(
        ToolArguments.JSON, "A tool call's arguments given as text: json (it must be JSON of an object, which "
        "the template gets as it renders one; else the record is refused: bad_tool_arguments) or keep_text "
        "(text that is not JSON is trained on as the text the record gave)."
    )
    max_length: int = doc(1024, "Maximum tokens per sample (and per packed row); encoder length for seq2seq.")
    max_target_length: int = doc(256, "Seq2seq only: maximum decoder (label) tokens.")
    truncation: Truncation = doc(Truncation.TURNS, "turns, right or drop (see Truncation).")
    packing: bool = doc(False, "Pack samples into rows of max_length (best-fit decreasing).")
    pack_window: int = doc(
        8192, "Samples packed together at a time; larger packs tighter and needs more memory."
    )
    on_bad_record: Literal["error", "skip"] = doc(
        "error", "error: stop at the first bad record; skip: count it and go on."
    )
    bad_examples: int = doc(20, "How many bad records (with path:line) go to bad_records.jsonl.")
    preview_samples: int = doc(8, "Samples shown in mask_preview.html.")
    map_batch_size: int = doc(256, "Records per Ray Data map batch.")
    map_concurrency: int = doc(0, "Ray Data render actors; 0: one per available CPU.")
    cache: str = doc(
        "", "Row cache: a bucket prefix (s3://..., gs://...) or a folder every node sees. Rows are kept there "
        "under the content fingerprint of what shapes them, prepared once and shared by every run and user "
        "with the same data, tokenizer and data keys (`chatsft cache list|prune`); empty: rows go to "
        "<run.output_dir>/data/ as before."
    )

    def _validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: at least one source is required")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{where}.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        for name in ("max_length", "max_target_length", "pack_window", "map_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.map_concurrency < 0:
            raise ConfigError(f"{where}.map_concurrency: must be >= 0")
        if self.cache and not storage.is_uri(self.cache):
            self.cache = storage.absolute(self.cache)  # tasks and later runs in other folders: the same place
        if self.chat_template_kwargs and self.template != Template.HF:
            raise ConfigError(f"{where}.chat_template_kwargs: only for data.template=hf (the tokenizer's own "
                              f"template); data.template is {self.template.value}")
        reserved = sorted(set(self.chat_template_kwargs) & {"messages", "tools", "documents", "add_generation_prompt"})
        if reserved:
            raise ConfigError(f"{where}.chat_template_kwargs.{reserved[0]}: chatsft sets it for every render")


# ------------------------------------------------------------------------ method


@dataclass
class LoraConfig:
    r: int = doc(16, "LoRA rank.")
    alpha: int = doc(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = doc(0.05, "Dropout on the LoRA input.")
    target_modules: Union[list[str], Literal["auto"]] = doc(
        "auto", "Module names to adapt; `auto`: the attention and MLP projections of the architecture."
    )
    modules_to_save: list[str] = doc(factory=list, text="Modules trained fully beside the adapter.")


@dataclass
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = doc("nf4", "4-bit quantization type (bitsandbytes).")
    double_quant: bool = doc(True, "Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = doc("bfloat16", "Matmul dtype.")


@dataclass
class PromptTuningConfig:
    variant: Literal["prompt_tuning", "p_tuning"] = doc("prompt_tuning", "PEFT method.")
    num_virtual_tokens: int = doc(20, "Trainable virtual tokens prepended to the input.")
    init_text: Optional[str] = doc(None, "Initialize prompt tuning from this text's embeddings.")
    encoder_hidden_size: int = doc(128, "P-tuning prompt encoder width.")


@dataclass
class MethodConfig:
    name: Literal["full", "lora", "qlora", "prompt_tuning"] = doc(
        "full", "full fine-tuning, LoRA, QLoRA (4-bit base, GPU only) or prompt tuning."
    )
    lora: LoraConfig = doc(factory=LoraConfig, text="LoRA options (lora and qlora).")
    quant: QuantConfig = doc(factory=QuantConfig, text="QLoRA quantization options.")
    prompt_tuning: PromptTuningConfig = doc(factory=PromptTuningConfig, text="Prompt tuning options.")
    export: Literal["merged", "adapter"] = doc(
        "merged", "PEFT export: adapter merged into the weights, or the adapter alone."
    )

    def _validate(self, where: str) -> None:
        # Options of a method that is not the one trained would be silently ignored: a recipe
        # for LoRA run with method.name=full must not train and export a full model unsaid.
        uses = {"full": (), "lora": ("lora",), "qlora": ("lora", "quant"), "prompt_tuning": ("prompt_tuning",)}
        for section in ("lora", "quant", "prompt_tuning"):
            if section in uses[self.name]:
                continue
            changed = _changed(getattr(self, section), type(getattr(self, section))())
            if changed:
                key = f"{where}.{section}.{changed[0]}"
                raise ConfigError(f"{key} is set but {where}.name={self.name} does not use "
                                  f"{where}.{section}.*; remove it or pick the method it belongs to")
        if self.export == "adapter" and self.name == "full":
            raise ConfigError(f"{where}.export=adapter: full fine-tuning has no adapter to export; "
                              f"use {where}.export=merged (a full model) or a PEFT method")


# ------------------------------------------------------------------------- train


@dataclass
class LrGroups:
    """Optional learning rates for parameter groups; null: train.lr."""

    embeddings: Optional[float] = doc(None, "Input embeddings.")
    head: Optional[float] = doc(None, "Output head (lm_head), when not tied to the embeddings.")
    matrices: Optional[float] = doc(None, "Everything else (attention, MLP, norms).")


@dataclass
class DeepSpeedConfig:
    # keys of older configs: refused with the way to say it now
    _retired = {"enabled": "train.deepspeed.enabled: replaced by train.engine (deepspeed, the default; "
                           "ddp, what enabled=false was; or fsdp2); set train.engine=ddp instead of "
                           "train.deepspeed.enabled=false"}
    stage: int = doc(2, "ZeRO stage 0-3.")
    offload_optimizer: bool = doc(False, "Keep optimizer state in CPU memory (ZeRO 1-3).")
    offload_params: bool = doc(False, "Keep parameters in CPU memory (ZeRO 3).")
    overrides: dict[str, Any] = doc(
        factory=dict, text="Raw keys merged into the generated DeepSpeed config (expert use)."
    )

    def _validate(self, where: str) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.stage: must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_params and self.stage != 3:
            raise ConfigError(f"{where}.offload_params: needs stage 3, got stage {self.stage}")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError(f"{where}.offload_optimizer: needs stage 1-3")


@dataclass
class FSDP2Config:
    reshard_after_forward: bool = doc(
        True, "Free each layer's gathered weights after its forward (gathered again for backward): ZeRO-3's "
        "memory; false keeps them until backward (ZeRO-2's memory, one all-gather fewer).")
    cpu_offload: bool = doc(
        False, "Keep the sharded parameters, gradients and optimizer state in CPU memory; the optimizer "
        "steps on the CPU.")


@dataclass
class TrainConfig:
    epochs: int = doc(1, "Passes over the training rows.")
    max_steps: int = doc(0, "Stop after this many optimizer steps; 0: epochs decide.")
    micro_batch_size: int = doc(4, "Rows per worker per forward pass.")
    grad_accum: int = doc(1, "Micro-batches per optimizer step on each worker.")
    optimizer: Literal["adamw"] = doc("adamw", "Optimizer.")
    lr: float = doc(2e-5, "Peak learning rate.")
    lr_groups: LrGroups = doc(factory=LrGroups, text="Per-group learning rates.")
    weight_decay: float = doc(0.0, "AdamW weight decay (not applied to norms and biases).")
    betas: list[float] = doc(factory=lambda: [0.9, 0.999], text="AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    schedule: Literal["linear", "cosine", "constant"] = doc(
        "cosine", "linear: decay to zero from init_lr_frac (nanochat SFT); cosine with warmup; constant."
    )
    warmup_steps: int = doc(0, "Linear warmup steps (cosine and constant).")
    warmup_ratio: float = doc(0.0, "Warmup as a fraction of total steps; used when warmup_steps is 0.")
    init_lr_frac: float = doc(1.0, "linear schedule: the multiplier of lr at step 0.")
    min_lr_frac: float = doc(0.0, "cosine schedule: floor as a fraction of lr.")
    clip_grad: float = doc(1.0, "Clip the global gradient norm; 0 disables.")
    precision: Literal["bf16", "fp32", "fp16"] = doc(
        "bf16", "bf16 mixed precision (fp32 master weights in DeepSpeed), fp32, or fp16."
    )
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    activation_offload: bool = doc(
        False, "With gradient_checkpointing: keep the checkpointed activations (each layer's input) in CPU "
        "memory between forward and backward instead of on the GPU; costs a copy each way per layer."
    )
    loss_head: Literal["learned", "full", "liger", "cce"] = doc(
        "learned", "learned: the output layer and cross-entropy on learned positions only, in chunks (no "
        "[tokens, vocab] logits; same loss and gradients); full: the model's whole logits; liger / cce: "
        "the learned positions through Liger's fused linear cross-entropy or Apple's Cut Cross-Entropy "
        "kernel (CUDA only, the liger-kernel / cut-cross-entropy package installed). Architectures whose "
        "head is not a plain Linear or whose logits are transformed (softcapping) use full."
    )
    loss_chunk: int = doc(
        0, "Learned head: positions projected at a time; 0: as many as fit 256 MiB of fp32 logits."
    )
    compile: Literal["off", "layers", "decoder"] = doc(
        "off", "torch.compile: each decoder layer (one graph reused by every layer: short compile), or "
        "the whole decoder body; the loss head stays eager. Any device; pays off on GPUs."
    )
    fused_optimizer: bool = doc(
        True, "AdamW's fused kernel (CUDA and CPU) on the ddp and fsdp2 engines; "
        "false: torch's per-tensor loop. DeepSpeed steps its own optimizer."
    )
    bf16_master_weights: bool = doc(
        True, "false: with precision bf16 and train.engine=ddp, load the weights in bf16 and step AdamW on "
        "them (no fp32 copy: half the weight and optimizer memory, bf16 rounding in every update)."
    )
    threads: int = doc(
        0, "CPU threads of each training worker (torch intra-op, Arrow reads); 0: every core this process "
        "may use with --local, scaling.resources_per_worker.CPU on Ray (so workers sharing a node do not "
        "oversubscribe it)."
    )
    log_every: int = doc(10, "Optimizer steps between progress lines and logged metrics.")
    eval_every: int = doc(0, "Steps between eval-loss passes; 0: only at the end.")
    eval_metrics_every: int = doc(0, "Steps between task evaluations (see eval); 0: only at the end.")
    save_every: int = doc(0, "Steps between checkpoints; 0: only at the end.")
    keep_checkpoints: int = doc(
        2, "Whole checkpoints kept (the newest); 0 keeps all. Retention deletes only whole checkpoints older "
        "than the newest ones kept; a partial or corrupt folder is never counted nor deleted.")
    stall_timeout_s: float = doc(
        0.0,
        "Hang watchdog; 0: off. When no optimizer step ends within this many seconds (count any "
        "eval or checkpoint between two steps in it), every rank's Python stack goes to the log and "
        "to MLflow, the attempt fails naming the slowest rank and its node, and scaling.max_failures "
        "restarts it from the latest checkpoint. Collectives (gloo/NCCL) time out at twice this, and not "
        "before 30 minutes.",
    )
    preemption_grace_s: float = doc(
        30.0,
        "Spot nodes (Ray workers): when a node holding a worker is drained with a deadline (a preemption "
        "notice), every rank saves a checkpoint at the next step boundary and stops; Ray Train restarts "
        "the group from it on the nodes left. This is the time kept for that checkpoint before the "
        "deadline: refused (the run stops at a checkpoint, naming this key) when a measured checkpoint "
        "takes longer. 0: drains are not watched.",
    )
    checkpoint_upload: Literal["async", "sync"] = doc(
        "async",
        "async: a checkpoint is saved to a local folder (the only checkpoint time a step waits for) and "
        "copied to run.output_dir (s3://, gs://, a shared disk) on a thread while training goes on, one "
        "upload at a time; it is listed (resumable) only once whole. sync: every rank waits for the copy. "
        "A plain local folder is always written directly.",
    )
    straggler_ratio: float = doc(
        1.3,
        "A rank whose busy time per step (its step time less its wait in collectives) exceeds the "
        "median rank's by this factor for 3 logging intervals in a row is named, with its host and node, "
        "in the log and MLflow (never stopped). 0: off.",
    )
    resume: Literal["auto", "never"] = doc(
        "auto",
        "auto: resume the latest checkpoint in the run's folder when it is this run (same rows, model, "
        "method and rows per step; changed optimization settings apply from the resumed step), refuse "
        "otherwise; never: move old checkpoints, model and result.json to archive/ and start fresh.",
    )
    engine: Literal["deepspeed", "fsdp2", "ddp"] = doc(
        "deepspeed", "What steps the model on each worker: deepspeed (ZeRO 0-3, offload; train.deepspeed), fsdp2 "
        "(PyTorch's fully_shard per decoder layer, DCP checkpoints that load into any worker count; "
        "train.fsdp2), ddp (plain torch: whole replicas, no DeepSpeed install needed).")
    deepspeed: DeepSpeedConfig = doc(factory=DeepSpeedConfig, text="DeepSpeed engine options (train.engine=deepspeed).")
    fsdp2: FSDP2Config = doc(factory=FSDP2Config, text="FSDP2 engine options (train.engine=fsdp2).")

    @property
    def zero3(self) -> bool:
        """DeepSpeed partitions the parameters (it places and casts them itself)."""
        return self.engine == "deepspeed" and self.deepspeed.stage == 3

    def _validate(self, where: str) -> None:
        for name in ("epochs", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "log_every", "eval_every", "save_every",
                     "eval_metrics_every", "keep_checkpoints", "threads", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.stall_timeout_s < 0:
            raise ConfigError(f"{where}.stall_timeout_s: must be >= 0 (0: off), got {self.stall_timeout_s}")
        if self.preemption_grace_s < 0:
            raise ConfigError(f"{where}.preemption_grace_s: must be >= 0 (0: off), got {self.preemption_grace_s}")
        if self.straggler_ratio != 0 and self.straggler_ratio <= 1:
            raise ConfigError(f"{where}.straggler_ratio: must be > 1 (0: off), got {self.straggler_ratio}")
        if len(self.betas) != 2:
            raise ConfigError(f"{where}.betas: expected two numbers, got {self.betas}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")


# ----------------------------------------------------------------------- scaling


@dataclass
class ScalingConfig:
    num_workers: int = doc(2, "Training workers (one per GPU on GPU clusters).")
    use_gpu: bool = doc(False, "One GPU per worker.")
    resources_per_worker: dict[str, float] = doc(
        factory=dict, text="Ray resources per worker, e.g. {CPU: 8, GPU: 1}; empty: {CPU: 1}."
    )
    accelerator_type: Optional[str] = doc(
        None, "Ray accelerator type (H100, A10G, ...) so the autoscaler picks the node type."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "PACK", "Placement group strategy: SPREAD puts workers on different nodes."
    )
    max_failures: int = doc(0, "Worker-group restarts from the latest checkpoint; -1: unlimited.")
    min_workers: int = doc(
        0, "Elastic training: the fewest workers a run goes on with (Ray Train's num_workers=(min, max), max "
        "being num_workers); 0: always num_workers. Rows per step stay micro x accum x num_workers, so each "
        "count in between must share them in micro-batches."
    )
    sequence_parallel: int = doc(
        1, "N workers of one node share each sequence (Ulysses: each holds L/N tokens, and attention its "
        "H/N heads over all L). Data-parallel size is num_workers / N; rows per step, their order and the "
        "loss are those of num_workers / N workers without it. N must divide num_workers and the model's "
        "attention and key-value heads."
    )

    def _validate(self, where: str) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{where}.num_workers: must be >= 1, got {self.num_workers}")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"{where}.min_workers: must be between 0 and num_workers ({self.num_workers}), "
                              f"got {self.min_workers}")
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures: must be >= -1")
        n = self.sequence_parallel
        if n < 1:
            raise ConfigError(f"{where}.sequence_parallel: must be >= 1, got {n}")
        if self.num_workers % n:
            raise ConfigError(f"{where}.sequence_parallel={n}: does not divide {where}.num_workers="
                              f"{self.num_workers}; use a worker count that is a multiple of {n}")
        if self.min_workers % n:
            raise ConfigError(f"{where}.sequence_parallel={n}: does not divide {where}.min_workers="
                              f"{self.min_workers}; an elastic run must keep whole sequence groups")


# ---------------------------------------------------------------------- tracking


@dataclass
class TrackingConfig:
    enabled: bool = doc(True, "Record the run in MLflow.")
    uri: Optional[str] = doc(
        None,
        "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else a SQLite store in run.output_dir.",
    )
    experiment: str = doc("chatsft", "MLflow experiment name.")
    required: bool = doc(True, "Fail before training if the tracking server is unreachable.")
    log_model: bool = doc(True, "Log the final model (adapter or full) with its tokenizer.")
    register_as: Optional[str] = doc(None, "Register the logged model under this name.")


# ------------------------------------------------------------------------- sweep


@dataclass
class SearchDim:
    """One dimension of the search space."""

    type: Literal["loguniform", "uniform", "choice", "grid"] = doc("grid", "Distribution.")
    low: Optional[float] = doc(None, "loguniform/uniform: lower bound.")
    high: Optional[float] = doc(None, "loguniform/uniform: upper bound.")
    values: list[Any] = doc(factory=list, text="choice/grid: the values.")

    def _validate(self, where: str) -> None:
        if self.type in ("loguniform", "uniform"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ConfigError(f"{where}: {self.type} needs low < high")
            if self.type == "loguniform" and self.low <= 0:
                raise ConfigError(f"{where}.low: loguniform needs low > 0")
        elif not self.values:
            raise ConfigError(f"{where}.values: {self.type} needs at least one value")


@dataclass
class SweepConfig:
    space: dict[str, SearchDim] = doc(
        factory=dict, text="Config key (dotted, e.g. train.lr) -> search dimension."
    )
    num_samples: int = doc(1, "Samples of the space (grids are crossed with each sample).")
    metric: str = doc("eval_loss", "Metric the scheduler and the best-trial choice use.")
    mode: Literal["min", "max"] = doc("min", "Minimize or maximize the metric.")
    scheduler: Literal["asha", "none"] = doc("asha", "Early stopping of bad trials.")
    grace_period: int = doc(1, "ASHA: evaluations before a trial can be stopped.")
    reduction_factor: int = doc(2, "ASHA: keep 1/reduction_factor at each rung.")
    max_concurrent: int = doc(0, "Trials at once; 0: as many as the cluster fits.")


# -------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    tasks: list[str] = doc(
        factory=lambda: ["heldout"],
        text="Tasks: `heldout` (generative, the eval split), `chat:PATH` (generative JSONL), "
        "`mc:PATH` (multiple-choice JSONL); `heldout@pkg.mod:fn` / `chat:PATH@pkg.mod:fn` score "
        "with fn(output, reference) instead of exact match.",
    )
    max_examples: int = doc(200, "Examples per task (0: all).")
    batch_size: int = doc(16, "Prompts per generation batch.")
    max_new_tokens: int = doc(64, "Generation limit.")
    temperature: float = doc(0.0, "0: greedy.")
    top_k: int = doc(0, "Sample from the k most likely tokens; 0: no limit.")
    num_samples: int = doc(1, "Samples per prompt (n of pass@k).")
    pass_k: list[int] = doc(factory=lambda: [1], text="k values for pass@k (each <= num_samples).")

    def _validate(self, where: str) -> None:
        for name in ("batch_size", "max_new_tokens", "num_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_examples", "top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"{where}.temperature: must be >= 0 (0: greedy), got {self.temperature}")
        for k in self.pass_k:
            if not 1 <= k <= self.num_samples:
                raise ConfigError(f"{where}.pass_k: k={k} must be between 1 and eval.num_samples={self.num_samples}")


# ------------------------------------------------------------------------- root


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def _validate(self, where: str) -> None:
        """Rules across sections, checked when the config loads: they need no data and no model."""
        if self.data.eval and self.data.eval_fraction > 0:
            raise ConfigError("data.eval_fraction: set together with data.eval; hold out from train "
                              "(eval_fraction) or give eval sources (data.eval), not both")
        if self.method.name == "prompt_tuning" and self.data.packing:
            raise ConfigError("method.name=prompt_tuning: does not work with data.packing=true (the virtual "
                              "tokens are prepended once per row, not per packed sequence)")
        if self.train.loss_head in ("liger", "cce") and not self.scaling.use_gpu:
            raise ConfigError(f"train.loss_head={self.train.loss_head}: a CUDA kernel, needs scaling.use_gpu=true; "
                              "use train.loss_head=learned on CPU (the same loss, chunked)")
        if not self.train.bf16_master_weights and (self.train.precision != "bf16" or self.train.engine != "ddp"):
            raise ConfigError("train.bf16_master_weights=false: needs train.precision=bf16 and "
                              "train.engine=ddp (DeepSpeed and FSDP2 keep fp32 masters)")
        if self.train.compile != "off" and self.train.zero3:
            raise ConfigError(f"train.compile={self.train.compile}: not with ZeRO-3 (its parameter hooks break "
                              "the compiled graphs); use train.deepspeed.stage<=2, train.engine=fsdp2 or "
                              "train.compile=off")
        if self.train.precision == "fp16" and self.train.engine != "deepspeed":
            raise ConfigError(f"train.precision=fp16: needs train.engine=deepspeed (loss scaling); "
                              f"use bf16 with train.engine={self.train.engine}")
        if self.scaling.sequence_parallel > 1:
            n = self.scaling.sequence_parallel
            if self.train.compile != "off":
                raise ConfigError(f"train.compile={self.train.compile}: not with scaling.sequence_parallel={n} (the "
                                  "all-to-all inside attention breaks the compiled layer graphs); use "
                                  "train.compile=off")
            if self.method.name == "prompt_tuning":
                raise ConfigError(f"method.name=prompt_tuning: not with scaling.sequence_parallel={n} (every part "
                                  "of a sequence would get the virtual tokens); use lora or full")
        if self.train.activation_offload and not self.train.gradient_checkpointing:
            raise ConfigError("train.activation_offload: offloads the checkpointed activations, so it needs "
                              "train.gradient_checkpointing=true")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params and sweep spaces."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


# ---------------------------------------------------------------------- loading


CONFIG_SUFFIXES = (".yaml", ".yml")


def load_config(path: Optional[Union[str, Path]] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read YAML (optional), apply `a.b=value` overrides, and build a validated Config."""
    raw: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                line = f":{mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None or loaded == {}:
            # Trained on, an empty file would be the defaults (the tiny model on the sample chats)
            # without a word that the file said nothing.
            raise ConfigError(f"{path}: the config file is empty (no keys); write the sections you mean "
                              "(`chatsft keys` lists every key, configs/ has recipes)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = loaded
    for item in overrides:
        apply_override(raw, item)
    try:
        return from_dict(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a raw dict; the value is parsed as YAML (`3e-4`, `[a, b]`, `true`)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    set_key(raw, key, value, what=f"override {item!r}")


def set_key(raw: dict[str, Any], key: str, value: Any, what: str = "") -> None:
    """Set dotted `key` in a raw (plain) config dict, making sections on the way."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what or key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        scalar = getattr(cls, "_from_scalar", None)
        if scalar is not None:
            try:
                obj = scalar(raw)
            except TypeError as e:
                raise ConfigError(f"{where or 'config'}: {e}") from None
            _run_validate(obj, where)
            return obj
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_show(raw)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key in getattr(cls, "_retired", {}):
            raise ConfigError(cls._retired[key])
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {_join(where, near[0])}?)" if near else ""
            raise ConfigError(f"{_join(where, str(key))}: unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], _join(where, f.name))
    obj = cls(**kwargs)
    _run_validate(obj, where)
    return obj


def replaced(obj: Any, where: str = "", **changes: Any) -> Any:
    """`dataclasses.replace` of a config or one of its sections (`where`: its key, e.g. "train"),
    validated as a loaded config is: every section below it, then the object itself. A config
    a stage builds in code is held to the rules of the one the user wrote."""
    new = dataclasses.replace(obj, **changes)
    validate(new, where)
    return new


def validate(obj: Any, where: str = "") -> None:
    """Run every `_validate` of a config tree, innermost first (the order loading uses)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                key = _join(where, f.name) + (f"[{i}]" if isinstance(value, list) else "")
                validate(item, key)
    _run_validate(obj, where)


def _run_validate(obj: Any, where: str) -> None:
    validate = getattr(obj, "_validate", None)
    if validate is not None:
        validate(where or type(obj).__name__.lower())


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{where}: {' or '.join(errors)}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"  # YAML 1.1 reads a bare off (on, no, yes) as a boolean
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, args))}; got {_show(value)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(m.value for m in tp)
            raise ConfigError(f"{where}: expected one of {choices}; got {_show(value)}") from None
    if origin is list:
        (item_tp,) = args
        if not isinstance(value, list):
            if dataclasses.is_dataclass(item_tp) and hasattr(item_tp, "_from_scalar"):
                value = [value]  # `train: data.jsonl` is a one-source list
            else:
                raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = args
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        return {str(k): _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {_show(value)}")
    raise TypeError(f"config type {tp!r} at {where} is not supported")  # a bug in this file


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _changed(value: Any, default: Any) -> list[str]:
    """The fields of dataclass `value` that differ from `default`'s."""
    return [f.name for f in dataclasses.fields(value) if getattr(value, f.name) != getattr(default, f.name)]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every key: the reference `chatsft keys` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((key, repr(_to_plain(default)), f.metadata.get("doc", "")))
    return rows
