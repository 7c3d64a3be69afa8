"""`llmkit finetune`: supervised fine-tuning (full, LoRA, prompt tuning, layer freezing) on chat JSONL,
or continued pretraining on plain text (`--data-format text`)."""

from __future__ import annotations

import argparse

from llmkit.cli._train_args import add_lora_args, add_run_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on instruction data (full | lora | prompt-tuning | freeze)",
        description=(
            "Supervised fine-tuning on JSONL (chat 'messages', Alpaca 'instruction/input/output', or "
            "'prompt/completion'), rendered with the tokenizer's chat template; the loss covers the "
            "assistant tokens; or plain text (a .txt file, a folder, a `llmkit data prepare` folder: "
            "--data-format text), the causal loss on every token. full/freeze write a model folder, "
            "lora/prompt-tuning a PEFT adapter folder."
        ),
    )
    p.add_argument("--model", required=True, help="base model folder (HF or llmkit format, with tokenizer)")
    p.add_argument("--data", required=True, nargs="+", help="training JSONL file(s), or one text file / folder / "
                   "prepared data folder")
    p.add_argument("--data-format", choices=["auto", "sft", "text"], default="auto",
                   help="sft: chat/instruction JSONL; text: continued pretraining on plain text (random windows "
                        "of --max-seq-len tokens); auto: text for one folder or a file not ending .jsonl/.json")
    p.add_argument("--val-data", nargs="+", help="validation JSONL file(s)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of --data for validation (text: the last fraction, default 0.1)")
    p.add_argument("--method", choices=["full", "lora", "prompt-tuning", "freeze"], default="lora")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: full/freeze 1e-4, lora 1e-3, "
                   "prompt-tuning 3e-2)")
    g.add_argument("--batch-size", type=int, default=8, help="examples (or packed rows) per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-minutes", type=float, help="time budget: stop (schedule finished) after this long")
    g.add_argument("--warmup-steps", type=int, help="default: 5%% of the steps")
    add_run_args(g)
    d = p.add_argument_group("data")
    d.add_argument("--max-seq-len", type=int,
                   help="longer examples are truncated and counted (default: the model's context, at most 1024)")
    d.add_argument("--packing", action="store_true", help="pack several examples per row (per-example attention)")
    d.add_argument("--train-on-prompt", action="store_true",
                   help="compute the loss on every token, not just the assistant's")
    lo = add_lora_args(p, dropout=0.05)
    lo.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha / sqrt(r)")
    lo.add_argument("--loraplus-lr-ratio", type=float, default=1.0,
                    help="LoRA+: the B matrices learn this many times faster than A (e.g. 16)")
    lo.add_argument("--quantize", choices=["int8", "int4"],
                    help="QLoRA: quantize the frozen base on load (int8 per channel, int4 group 64), LoRA on top")
    pt = p.add_argument_group("prompt tuning")
    pt.add_argument("--num-virtual-tokens", type=int, default=20)
    pt.add_argument("--prompt-tuning-init-text",
                    help="initialise the virtual tokens from this text (default: random vocabulary rows)")
    fr = p.add_argument_group("freeze")
    fr.add_argument("--trainable", nargs="+", metavar="GLOB",
                    help="train only parameters matching these globs (e.g. 'blocks.3.*' lm_head.weight)")
    fr.add_argument("--freeze-layers", type=int, help="freeze the embeddings and the bottom N blocks")
    p.add_argument("--qat", choices=["int8", "int4"],
                   help="quantization-aware training (full/freeze): fake-quantized projections with a "
                        "straight-through estimator; --out gets the real quantized model")
    p.add_argument("--qat-group-size", type=int, default=64, help="inputs per QAT scale (0 = per channel, int8)")
    p.add_argument("--keep-zeros", action="store_true",
                   help="zero block weights stay zero (recovering a magnitude/wanda/sparsegpt/2:4-pruned model)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.train.finetune import finetune, report

    result = finetune(
        args.model, args.data, args.out, method=args.method, val_data=args.val_data, max_steps=args.max_steps,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, resume=args.resume,
        overwrite=args.overwrite, eval_interval=args.eval_interval, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, seed=args.seed, device=args.device, dtype=args.dtype,
        num_threads=args.num_threads, progress=not args.no_progress,
        val_fraction=args.val_fraction, max_seq_len=args.max_seq_len, packing=args.packing,
        train_on_prompt=args.train_on_prompt, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, use_rslora=args.rslora,
        loraplus_lr_ratio=args.loraplus_lr_ratio, qat=args.qat, qat_group_size=args.qat_group_size,
        quantize=args.quantize,
        num_virtual_tokens=args.num_virtual_tokens, prompt_tuning_init_text=args.prompt_tuning_init_text,
        trainable=args.trainable or [], freeze_layers=args.freeze_layers,
        activation_checkpointing=args.activation_checkpointing, max_minutes=args.max_minutes,
        data_format=args.data_format, keep_zeros=args.keep_zeros,
    )
    print(report(result))
    return 0
