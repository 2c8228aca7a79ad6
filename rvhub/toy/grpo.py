"""GRPO on the toy task with TRL's real ``GRPOTrainer`` (CPU, float32)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rvhub.toy import tasks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from rvhub.toy.family import Recipe


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)  # conversational form: a list of messages


def correctness_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1 when the first 'The answer is N' of the completion gives the right N, else 0."""
    return [1.0 if tasks.parse_answer(_text(c)) == int(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def make_format_reward(weight: float) -> Callable[..., list[float]]:
    def format_reward(completions: list[Any], **_: Any) -> list[float]:
        """``weight`` for a completion whose last sentence is 'The answer is N.'"""
        return [weight if tasks.ANSWER_RE.search(_text(c).strip().split(". ")[-1]) else 0.0 for c in completions]

    return format_reward


def train_grpo(model: PreTrainedModel, tok: PreTrainedTokenizerFast, train: list[tasks.Problem], recipe: Recipe,
               seed: int, workdir: Path, say: Callable[[str], None]) -> None:
    """Train ``model`` in place for ``recipe.grpo_steps`` GRPO steps on ``train``'s prompts."""
    from datasets import Dataset  # type: ignore[import-untyped]
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer  # type: ignore[attr-defined]

    for name in ("trl", "transformers", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if recipe.grpo_batch % recipe.grpo_generations:
        raise ValueError("grpo_batch must be a multiple of grpo_generations")
    # Some prompts carry an irrelevant sentence (the train split's own adversarial form): SFT never saw
    # distractors, so ignoring them is a skill only the reward teaches.
    adv = [i % 100 < recipe.grpo_adversarial * 100 for i in range(len(train))]
    rows = [{"prompt": p.prompt(a), "answer": str(p.answer)} for p, a in zip(train, adv, strict=True)]
    data = Dataset.from_list(rows)
    args = GRPOConfig(
        output_dir=str(workdir), use_cpu=True, bf16=False, fp16=False, seed=seed, data_seed=seed,
        learning_rate=recipe.grpo_lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=recipe.grpo_steps,
        per_device_train_batch_size=recipe.grpo_batch, gradient_accumulation_steps=1,
        num_generations=recipe.grpo_generations, max_completion_length=32, temperature=recipe.grpo_temperature,
        beta=recipe.grpo_beta, logging_steps=max(1, recipe.grpo_steps // 6), save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        reward_weights=[1.0, 1.0],
    )
    t0 = time.monotonic()

    class _Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs: dict[str, float] = kwargs.get("logs") or {}
            reward = logs.get("reward", float("nan"))
            acc = logs.get("rewards/correctness_reward/mean", float("nan"))
            zero = logs.get("frac_reward_zero_std", float("nan"))
            say(f"  rl: step {state.global_step}/{recipe.grpo_steps} reward {reward:.3f} correct {acc:.3f} "
                f"zero-std groups {zero:.2f} ({time.monotonic() - t0:.0f}s)")

    rewards: list[Any] = [correctness_reward, make_format_reward(recipe.format_reward)]
    trainer = GRPOTrainer(model=model, reward_funcs=rewards,
                          args=args, train_dataset=data, processing_class=tok, callbacks=[_Progress()])
    trainer.train()
    model.eval()  # type: ignore[no-untyped-call]
