"""Full supervised fine-tuning (`minimind-jax sft`): the references' train_full_sft.py. The
loss covers the assistant replies of {"conversations": [...]} rows; the run starts from the
pretrain weights (minimind-3's recipe: rounded to float16, as its .pth files hold them)."""

from minimind_jax.train.stages.stage import Stage

STAGE = Stage(
    name="sft",
    summary="Full supervised fine-tuning on {\"conversations\": [...]} JSONL",
    description="Full supervised fine-tuning on {\"conversations\": [...]} JSONL (the "
                "reference's train_full_sft.py), starting from the pretrain weights; the loss "
                "covers the assistant replies only.",
    samples="sft",
    data_path="./dataset/sft_mini_512.jsonl",
    tracker_project="MiniMind-Full-SFT",
    defaults={
        "minimind2": dict(epochs=1, batch_size=32, learning_rate=5e-5, accumulation_steps=1,
                          run_prefix="full_sft"),
        # minimind-3's trainer/train_full_sft.py
        "minimind3": dict(epochs=2, batch_size=16, learning_rate=1e-5, accumulation_steps=1,
                          max_seq_len=768, run_prefix="full_sft"),
    },
    start_from={"minimind2": "pretrain", "minimind3": "pretrain"},
    start_rounded_to_float16=True,
)
