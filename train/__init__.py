"""Training and evaluation jobs: gate distillation, fine-tuning, perplexity evaluation.

Jobs: each CLI builds its config from flags and calls one library function; no job imports another job.

    distill_gates.py   python -m train.distill_gates   → distill.distill         (+ perplexity.evaluate, the demo)
    finetune.py        python -m train.finetune        → lm_training.finetune
    eval_ppl.py        python -m train.eval_ppl        → perplexity.evaluate

Libraries:

    distill.py            gate self-distillation: DistillConfig, distill
    lm_training.py        full-parameter causal-LM training (dense or SeerAttention): FinetuneConfig, finetune
    perplexity.py         perplexity vs. block density: EvalConfig, evaluate (results: ppl_results.py; decode
                          mode, teacher-forced sparse decoding: decode_perplexity.py)
    losses.py             every loss: next-token NLL and cross-entropy, the gates' KL, SeerAttention fine-tuning
    optimizer.py          the one optimizer recipe: OptimizerConfig, build_optimizer
    trainer.py            the training loop (TrainLoopConfig, fit); train_step.py one jitted step;
                          train_checkpoints.py the training-state checkpoints a run resumes from
    documents.py, token_corpus.py, data.py    text files → token ids (CorpusConfig) → packed rows (LoaderConfig)
    model_source.py       the model a run starts from: checkpoint, config.json or preset; YaRN
    demo/                 the embedded demo: standard-library corpus, its tokenizer, a small pretrained Llama

CLI support: flags.py (flags several CLIs share), progress.py (log lines and progress bars).

Both training configs compose the same sub-configs: CorpusConfig, LoaderConfig, OptimizerConfig, TrainLoopConfig
and `seer_jax.sharding.MeshConfig`.
"""
