"""The references' console lines, written and read back in one place.

MiniMind2 prints `Epoch:[e/E](b/iters) loss:.. lr:.. epoch_Time:..min:` at 0-based batches b
with b % interval == 0. minimind-3 prints `Epoch:[e/E](s/iters), loss: .., logits_loss: ..,
aux_loss: .., lr: .., epoch_time: ..min` at 1-based steps s with s % interval == 0 and at each
epoch's last step. Training writes these lines (`LineStyle`); `compare` parses them back
(`parse_reference_log`) and maps a minimind-3 export's log calls to micro-steps (`logged_steps`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"
REFERENCE_LINE = re.compile(
    r"Epoch:\[(?P<epoch>\d+)/(?P<epochs>\d+)\]\((?P<step>\d+)/(?P<iters>\d+)\)"
    rf"(?P<minimind3>,)?\s*loss:\s*(?P<loss>{_NUMBER})",
    re.IGNORECASE,
)


def minimind2_line(epoch: int, epochs: int, batch: int, batches: int, loss: float, lr: float,
                   epoch_seconds: float, batches_done: int) -> str:
    """MiniMind2's line (`epoch`, `batch` 0-based; it prints the batch 0-based too)."""
    minutes_left = epoch_seconds / batches_done * batches // 60 - epoch_seconds // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch}/{batches}) loss:{loss:.3f} lr:{lr:.12f} "
            f"epoch_Time:{minutes_left}min:")


def minimind3_line(epoch: int, epochs: int, batch: int, batches: int, loss: float, aux: float,
                   lr: float, epoch_seconds: float, batches_done: int) -> str:
    """minimind-3's line, which prints the step 1-based (logits_loss = loss - aux)."""
    eta_min = epoch_seconds / batches_done * (batches - batch - 1) // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch + 1}/{batches}), loss: {loss:.4f}, "
            f"logits_loss: {loss - aux:.4f}, aux_loss: {aux:.4f}, lr: {lr:.8f}, "
            f"epoch_time: {eta_min:.1f}min")


def is_logged_batch(batch: int, batches: int, interval: int, minimind3: bool) -> bool:
    """Whether the reference logs 0-based `batch` of an epoch of `batches`."""
    if minimind3:
        return (batch + 1) % interval == 0 or batch + 1 == batches
    return batch % interval == 0


def logged_steps(interval: int, iters: int) -> Iterator[int]:
    """The global micro-steps (0-based) minimind-3's trainer logs at, in order, over as many
    epochs of `iters` batches as are consumed."""
    epoch = 0
    while True:
        for batch in range(iters):
            if is_logged_batch(batch, iters, interval, minimind3=True):
                yield epoch * iters + batch
        epoch += 1


def parse_reference_log(lines: Iterable[str]) -> list[tuple[int, float]]:
    """(global micro-step, loss) of each reference line in `lines`; other lines are ignored.
    minimind-3's lines (a comma before `loss:`) count steps from 1, MiniMind2's from 0. Epochs
    count from 1, except in a log with an epoch 0 (MiniMind2's train_distillation.py prints
    `Epoch:[e/E-1]` with e from 0)."""
    matches = [m for m in map(REFERENCE_LINE.search, lines) if m]
    first_epoch = 0 if any(int(m["epoch"]) == 0 for m in matches) else 1
    return [((int(m["epoch"]) - first_epoch) * int(m["iters"]) + int(m["step"])
             - (1 if m["minimind3"] else 0), float(m["loss"])) for m in matches]


@dataclasses.dataclass(frozen=True)
class LineStyle:
    """Which reference's console line a run prints, and at which batches."""

    epochs: int
    batches: int  # per epoch
    interval: int  # --log_interval
    minimind3: bool
    # a stage's own line (train.objective.Objective.line), else the arch's pretrain/SFT line
    line_fn: Callable | None = None

    def is_logged(self, batch: int) -> bool:
        return is_logged_batch(batch, self.batches, self.interval, self.minimind3)

    def line(self, epoch: int, batch: int, record: dict, epoch_seconds: float,
             batches_done: int) -> str:
        if self.line_fn is not None:
            return self.line_fn(epoch, self.epochs, batch, self.batches, record, epoch_seconds,
                                batches_done)
        if self.minimind3:
            return minimind3_line(epoch, self.epochs, batch, self.batches, record["loss"],
                                  record["aux"], record["lr"], epoch_seconds, batches_done)
        return minimind2_line(epoch, self.epochs, batch, self.batches, record["loss"],
                              record["lr"], epoch_seconds, batches_done)


# --- the post-training scripts' lines: (epoch, epochs, batch, batches, record, epoch_seconds,
# batches_done) -> line, as LineStyle.line_fn -----------------------------------------------

def minimind2_divided_line(accumulation_steps: int) -> Callable:
    """MiniMind2's train_dpo.py / train_distill_reason.py line: the pretrain/SFT line with the
    loss divided by the accumulation steps (the value they back-propagate and print)."""

    def line(epoch, epochs, batch, batches, record, epoch_seconds, batches_done) -> str:
        return minimind2_line(epoch, epochs, batch, batches, record["loss"] / accumulation_steps,
                              record["lr"], epoch_seconds, batches_done)

    return line


def minimind3_dpo_line(epoch, epochs, batch, batches, record, epoch_seconds,
                       batches_done) -> str:
    """minimind-3's train_dpo.py line (1-based step)."""
    eta_min = epoch_seconds / batches_done * (batches - batch - 1) // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch + 1}/{batches}), loss: {record['loss']:.4f}, "
            f"dpo_loss: {record['dpo_loss']:.4f}, aux_loss: {record['aux']:.4f}, "
            f"learning_rate: {record['lr']:.8f}, epoch_time: {eta_min:.3f}min")


def minimind2_distill_line(epoch, epochs, batch, batches, record, epoch_seconds,
                           batches_done) -> str:
    """MiniMind2's train_distillation.py line: 0-based epoch over epochs - 1."""
    minutes_left = epoch_seconds / batches_done * batches // 60 - epoch_seconds // 60
    return (f"Epoch:[{epoch}/{epochs - 1}]({batch}/{batches}) loss:{record['loss']:.4f} "
            f"lr:{record['lr']:.12f} epoch_Time:{minutes_left}min:")


def minimind3_distill_line(epoch, epochs, batch, batches, record, epoch_seconds,
                           batches_done) -> str:
    """minimind-3's train_distillation.py line (1-based step)."""
    eta_min = epoch_seconds / batches_done * (batches - batch - 1) // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch + 1}/{batches}), loss: {record['loss']:.4f}, "
            f"ce: {record['ce']:.4f}, aux_loss: {record['aux']:.4f}, "
            f"distill: {record['distill']:.4f}, learning_rate: {record['lr']:.8f}, "
            f"epoch_time: {eta_min:.3f}min")


def minimind3_grpo_line(lr_after: Callable[[int], float]) -> Callable:
    """minimind-3's train_grpo.py line (1-based step); the LR it prints is read after the
    scheduler's step: `lr_after(updates done)`."""

    def line(epoch, epochs, batch, batches, record, epoch_seconds, batches_done) -> str:
        del epoch_seconds, batches_done
        return (f"Epoch:[{epoch + 1}/{epochs}]({batch + 1}/{batches}), "
                f"Reward: {record['reward']:.4f}, KL_ref: {record['kl_ref']:.4f}, "
                f"Adv Std: {record['advantages_std']:.4f}, "
                f"Adv Mean: {record['advantages_mean']:.4f}, Actor Loss: {record['loss']:.4f}, "
                f"Avg Response Len: {record['avg_response_len']:.2f}, "
                f"Learning Rate: {lr_after(record['update']):.8f}")

    return line


def minimind3_ppo_line(epoch, epochs, batch, batches, record, epoch_seconds,
                       batches_done) -> str:
    """minimind-3's train_ppo.py line (1-based step; the LRs after the schedulers' steps)."""
    del epoch_seconds, batches_done
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch + 1}/{batches}), "
            f"Reward: {record['reward']:.4f}, KL_ref: {record['kl_ref']:.4f}, "
            f"Approx KL: {record['approx_kl']:.4f}, ClipFrac: {record['clipfrac']:.4f}, "
            f"Critic Loss: {record['critic_loss']:.4f}, "
            f"Avg Response Len: {record['avg_response_len']:.2f}, "
            f"Actor LR: {record['actor_lr']:.8f}, Critic LR: {record['critic_lr']:.8f}")
