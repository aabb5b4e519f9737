"""minimind_jax: a pure-functional JAX port of the MiniMind2 and minimind-3 training pipelines.

Layers, one folder each, lowest first:

    errors < runtime < model < data < infer < train < serve < tools < cli

A module imports only its own layer and those below, imports inside functions included
(tests/test_layout.py checks every edge), so loading `model.weights` loads neither training nor
the command line. `errors` (top level): the error kinds; `runtime`: process and devices;
`model`: config, transformer, loss, weights in and out, run checkpoints read
(`model.run_checkpoint`), and the flags every command shares (`model.flags`: the model group,
the help formatter); `data`: samples to batches, tokenizers; `infer`: generation (`eval` in
`train` samples with it); `train`: training, its checkpoints written, the reference scripts'
flags; `serve`; `tools`: compare, demo, benchmarks; `cli`: the parser over every layer's
commands (each module's `register`).

The training path, flags to checkpoint (every stage of `train.stages.STAGES`: pretrain, sft,
lora, dpo, distill, distill_reason, grpo; `train.run` from Python)::

    flags --train.flags.config_from_args--> TrainConfig (train.train_config: model, data,
        optim, run, eval, distributed, recipe; frozen; None fields resolved once by
        TrainConfig.resolved from the stage's defaults and the recipe)
    TrainConfig + Stage (train.stages.<name>: its defaults, rows, start weights, trained
        part, objective, batch producer, end) --train.setup.build_run--> Run (tokenizer,
        model, locked run folder (train.run_folder), data, train state fresh or resumed, step
        functions, checkpoint manager, RunLog)
    the data path, one module per stage (minimind-3's sample rules: data.minimind3):
        JSONL --data.samples (validated records; MiniMind2's ids, loss masks)--> samples
        --data.token_cache (tokenized once, memory-mapped; built on first use or by
        `prepare`)--> token cache --data.rows (CachedSource | PackedSource (data.packing) |
        the minimind-3 SFT source; rows.open_source: a file's rows)--> rows
        --data.batches (Loader.epoch: shuffled per epoch, this process's share)--> numpy
        batches --train.train_step.put_batch--> device batch
        --train.train_step.make_train_step (model, loss, optim)--> new train state + metrics
    train.loop.train_loop: metrics --train.run_log.RunLog--> metrics.jsonl, tracker, console
        line (train.log_lines); state --train.loop.save_checkpoint--> checkpoints/<step>/
        (train.checkpoint: orbax)
    a stage's objective (train.stages.stage.Objective) brings its own loss, a frozen second
        params tree (DPO's reference model, the teacher) passed to every step, its own rows
        (data.pairs for DPO), console line, and batch producer (batches made from the
        current train state, before each step)

Importing it changes nothing in the process: the CPU tunings
(`runtime.xla_flags.apply_cpu_defaults`, `runtime.host_memory.reexec_with_hugepages`) are
applied by the CLI entry point, or by whoever calls them.
"""

__version__ = "0.1.0"
