"""What a worker tells the user and the callbacks while it trains: per-interval metrics,
progress lines on rank 0, and the steady step time."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional


def say(text: str) -> None:
    """One progress line on stdout. Not print(): Ray Train patches print on its workers to log
    *and* echo, which shows every line twice."""
    sys.stdout.write(f"[chatsft] {text}\n")
    sys.stdout.flush()


def brief(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if not k.endswith(("/examples", "/skipped")))


class Meter:
    """Per-interval sums; flushed (all-reduced) only on logging steps, the same on every rank."""

    def __init__(self) -> None:
        self.empty_total = 0
        self.last_report = time.perf_counter()
        self.lr = 0.0
        self.reset()

    def reset(self) -> None:
        self.loss_sum_local = 0.0
        self.supervised = 0  # already global
        self.tokens_local = 0
        self.slots_local = 0
        self.steps = 0
        self.empty_steps = 0
        self.applied = 0
        self.grad_norm = float("nan")
        self.t0 = time.perf_counter()

    def flush(self, rt: Any, engine: Any, state: Any, report_due: bool) -> dict[str, Any]:
        """The interval's metrics. `report_due` is rank 0's decision whether this logging step
        also reports to Ray Train (each report is a barrier through the controller, about a
        second on a small machine); it rides on this all-reduce, so every rank reports the
        same number of times."""
        loss_sum, tokens, slots, report = rt.all_reduce(
            [self.loss_sum_local, float(self.tokens_local), float(self.slots_local), float(report_due)])
        if report:
            self.last_report = time.perf_counter()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.empty_total += self.empty_steps
        m: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch,
            "lr": self.lr,
            "supervised_tokens": self.supervised,
            "tokens_per_second": tokens / dt,
            "supervised_tokens_per_second": self.supervised / dt,
            "step_time": dt / max(self.steps, 1),
            "pad_fraction": 1.0 - tokens / slots if slots else 0.0,
            "skipped_steps": engine.skipped_steps,
            "empty_steps": self.empty_total,
            "report_now": bool(report),
        }
        if self.supervised:
            m["train_loss"] = loss_sum / self.supervised
        if math.isfinite(self.grad_norm):
            m["grad_norm"] = self.grad_norm
        self.reset()
        return m


class Steady:
    """Mean time of the optimizer steps after the first (which pays for warm-up and JIT builds).

    Logging, eval and checkpoint steps are included: it is the loop's real pace."""

    def __init__(self) -> None:
        self.t_first: Optional[float] = None
        self.n = 0
        self.t_last = 0.0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        else:
            self.n += 1
            self.t_last = now

    def mean(self) -> Optional[float]:
        return (self.t_last - self.t_first) / self.n if self.n else None


class Progress:
    """Rank 0's progress lines, and the one place per-step metrics go out (callbacks)."""

    def __init__(self, enabled: bool, total: int, start_step: int, callbacks: list) -> None:
        self.enabled, self.total, self.start_step, self.callbacks = enabled, total, start_step, callbacks
        self.t0 = time.perf_counter()

    def line(self, text: str) -> None:
        if self.enabled:
            say(text)

    def step(self, step: int, m: dict[str, Any], fresh: dict[str, Any]) -> None:
        """A progress line from the running metrics `m`; callbacks get what this interval measured."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start_step, 1) * (self.total - step)
        loss = f"{m['train_loss']:.4f}" if "train_loss" in m else "-"
        norm = f"{m['grad_norm']:.3f}" if "grad_norm" in m else "-"
        self.line(f"step {step}/{self.total}  loss {loss}  lr {m['lr']:.3g}  grad norm {norm}  "
                  f"supervised {m['supervised_tokens']}  {m['tokens_per_second']:.0f} tok/s  "
                  f"ETA {_fmt_time(eta)}")
        self.emit(step, {k: v for k, v in fresh.items() if k != "report_now"})

    def emit(self, step: int, metrics: dict[str, Any]) -> None:
        if self.enabled:
            for cb in self.callbacks:
                cb(step, dict(metrics))

    def flush(self, timeout: float = 10.0) -> None:
        """Callbacks that buffer (the MLflow logger) send what they hold, within `timeout`."""
        if self.enabled:
            for cb in self.callbacks:
                getattr(cb, "flush", lambda timeout: None)(timeout)

    def close(self) -> None:
        """Callbacks that buffer (the MLflow logger) flush here, before the worker exits."""
        if self.enabled:
            for cb in self.callbacks:
                getattr(cb, "close", lambda: None)()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"
