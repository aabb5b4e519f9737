"""RL rewards: minimind-3's rule rewards and its reward-model plumbing (shared/SPEC_RL.md 1.3,
trainer/train_grpo.py `calculate_rewards`, trainer_utils.LMForRewardModel), exactly.

Per completion (float32, in the script's order of operations): +0.5 if 20 <= len(text.strip())
<= 800 else -0.5; with a `</think>`: +1.0 if 20 <= len(think.strip()) <= 300 else -0.5, +0.25
if exactly one `</think>` else -0.25, and the answer is what follows it (stripped); minus the
answer's repetition penalty; plus the reward model's score of the answer (clipped to +-3).

Reward models: `none` (rules only, a score of 0), or a folder a Hugging Face reward model
loads from (`AutoModel.from_pretrained(..., trust_remote_code=True)` with its `get_score`, as
InternLM2-1.8B-Reward; needs torch and transformers).
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from minimind_jax.errors import UserError

_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\s+(.*?)<\|im_end\|>", re.DOTALL)
_WORD = re.compile(r"\w+|[^\w\s]")
SCORE_CLIP = 3.0


def rep_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """The share of repeated word n-grams, scaled to at most `cap`."""
    tokens = _WORD.findall(text.lower())
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def prompt_messages(prompt: str) -> list[dict]:
    """The closed turns of a rendered prompt (the open generation prompt is not one)."""
    return [{"role": role, "content": content.strip()} for role, content in _TURN.findall(prompt)]


def rule_reward(response: str) -> tuple[np.float32, str]:
    """(the rules' reward in float32, the answer the reward model scores)."""
    f32 = np.float32
    reward = f32(0.0)
    reward = f32(reward + f32(0.5 if 20 <= len(response.strip()) <= 800 else -0.5))
    answer = response
    if "</think>" in response:
        think, rest = response.split("</think>", 1)
        reward = f32(reward + f32(1.0 if 20 <= len(think.strip()) <= 300 else -0.5))
        reward = f32(reward + f32(0.25 if response.count("</think>") == 1 else -0.25))
        answer = rest.strip()
    return f32(reward - f32(rep_penalty(answer))), answer


class NoRewardModel:
    """`--reward_model_path none`: the rules alone."""

    def score(self, messages: list[dict], response: str) -> float:
        del messages, response
        return 0.0


class HFRewardModel:
    """A Hugging Face reward model with `get_score(tokenizer, conversation)` (InternLM2-Reward's
    interface), in float16 on the CPU, given the conversation as LMForRewardModel builds it."""

    def __init__(self, path: str):
        try:
            import torch
            import transformers
        except ImportError as err:
            raise UserError(f"--reward_model_path {path}: a Hugging Face reward model needs "
                            f"torch and transformers ({err.name} is missing); or pass "
                            "--reward_model_path none for the rule rewards alone") from None
        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.model = transformers.AutoModel.from_pretrained(
            path, torch_dtype=torch.float16, trust_remote_code=True).eval()

    def score(self, messages: list[dict], response: str) -> float:
        history = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
        query = messages[-1]["content"] if messages else ""
        context = f"{history}\n以上是对话历史。我的新问题是：\n{query}" if history else query
        conversation = [{"role": "user", "content": context},
                        {"role": "assistant", "content": response}]
        with self.torch.no_grad():
            score = self.model.get_score(self.tokenizer, conversation)
        return max(min(score, SCORE_CLIP), -SCORE_CLIP)


def reward_model(path: str | None):
    """`none` (or None): NoRewardModel; else the folder's HFRewardModel."""
    if path in (None, "none"):
        return NoRewardModel()
    if not pathlib.Path(path).is_dir():
        raise UserError(f"--reward_model_path {path}: no such folder (a Hugging Face reward "
                        "model, e.g. internlm2-1_8b-reward); pass --reward_model_path none for "
                        "the rule rewards alone")
    return HFRewardModel(path)


def completion_rewards(prompts, completions: list[str], num_generations: int,
                       model) -> np.ndarray:
    """[N] float32 rewards of completion i * G + j of prompt i, rules then model scores."""
    rules = np.zeros(len(completions), np.float32)
    scores = []
    for n, response in enumerate(completions):
        rules[n], answer = rule_reward(response)
        scores.append(model.score(prompt_messages(prompts[n // num_generations]), answer))
    return rules + np.asarray(scores, np.float32)
