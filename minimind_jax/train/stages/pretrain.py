"""Pretraining (`minimind-jax pretrain`): the references' train_pretrain.py. Next-token loss on
every real token of {"text": ...} rows, from a seeded random init."""

from minimind_jax.train.stages.stage import Stage

STAGE = Stage(
    name="pretrain",
    summary="Pretrain a model on {\"text\": ...} JSONL",
    description="Pretrain a MiniMind2 model on {\"text\": ...} JSONL (the reference's "
                "train_pretrain.py): next-token loss on every real token.",
    samples="pretrain",
    data_path="./dataset/pretrain_hq.jsonl",
    tracker_project="MiniMind-Pretrain",
    defaults={
        "minimind2": dict(epochs=1, batch_size=32, learning_rate=5e-4, accumulation_steps=8,
                          run_prefix="pretrain"),
        # minimind-3's trainer/train_pretrain.py
        "minimind3": dict(epochs=2, batch_size=32, learning_rate=5e-4, accumulation_steps=8,
                          max_seq_len=340, run_prefix="pretrain"),
    },
)
