"""minimind_jax: a pure-functional JAX port of the MiniMind2 pretrain + full-SFT pipeline.

The training path, flags to checkpoint (`pretrain`/`sft`; `train.trainer.run` from Python)::

    flags --trainer.run_stage--> TrainConfig (train.train_config: model, data, optim, run,
                                 eval, distributed; frozen, built once)
    TrainConfig --trainer.build_run--> Run (tokenizer, model, locked run folder, data, train
                                            state fresh or resumed, step functions,
                                            checkpoint manager, RunLog)
    the data path (package data), one module per stage (minimind-3's sample rules: minimind3):
        JSONL --samples (validated records; MiniMind2's ids, loss masks)--> samples
        --token_cache (tokenized once, memory-mapped; built on first use or by `prepare`)-->
        token cache --rows (CachedSource | PackedSource(packing) | Minimind3SFTSource;
        rows.open_source: a file's rows, its cache built on first use)--> rows
        --batches (Loader.epoch: shuffled per epoch, this process's share)--> numpy batches
        --train.train_step.put_batch--> device batch --train_step.make_train_step (model,
        loss, optim)--> new train state + metrics
    trainer.train_loop: metrics --RunLog--> metrics.jsonl, tracker, console line;
                        state --trainer.save_checkpoint--> checkpoints/<step>/ (train.checkpoint:
                        orbax)

Importing it changes nothing in the process: the CPU tunings
(`runtime.xla_flags.apply_cpu_defaults`, `runtime.host_memory.reexec_with_hugepages`) are applied
by the CLI entry point, or by whoever calls them.
"""

__version__ = "0.1.0"
