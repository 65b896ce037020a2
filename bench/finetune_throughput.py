"""Training throughput: a fine-tune launched through modeldeck (its job process, live reporting to the
database, checkpoints) vs a bare PEFT + transformers Trainer script, same model, data and
hyperparameters, in one run (target: ratio of tokens/s ≥ 0.95).
Run: python bench/finetune_throughput.py [--device cpu|cuda] [--rounds 3]

Both train a LoRA on the same randomly initialised Llama (sized for the device) over the same tokenized
rows (modeldeck's own encoding, so both see identical tokens), and both are measured the same way:
real (non-padding) tokens trained on, divided by the Trainer's own train_runtime. Model loading and
tokenizing are outside the measure for both. Runs alternate, so drift in the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import fresh_home

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # hidden, layers, heads, ffn: a step that takes real time on each device
    "cpu": (256, 4, 8, 1024),
    "cuda": (2048, 16, 16, 5632),
}
HYPERPARAMETERS = dict(max_steps=60, batch_size=8, grad_accum=1, learning_rate=2e-4, val_split=0, max_length=256)

BARE = r'''
import json, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
sys.path.insert(0, sys.argv[3])
from engine.datasets import chat_template, encode, read_dataset
from engine.hyperparameters import TARGET_MODULES

model_dir, data, _, hp = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
on_gpu = torch.cuda.is_available()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
template, _ = chat_template(tokenizer)
rows = [encode(tokenizer, template, ex, hp["max_length"]) for ex in read_dataset(data).examples]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                             device_map={"": 0} if on_gpu else None)
torch.manual_seed(42)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                         target_modules=TARGET_MODULES["llama"].split(",")))
tokens = 0
def collate(batch):
    global tokens
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"]); tokens += n
        ids[i, :n] = torch.tensor(r["input_ids"]); labels[i, :n] = torch.tensor(r["labels"]); mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
args = TrainingArguments(output_dir=sys.argv[5], per_device_train_batch_size=hp["batch_size"],
                         gradient_accumulation_steps=hp["grad_accum"], learning_rate=hp["learning_rate"],
                         max_steps=hp["max_steps"], lr_scheduler_type="cosine", warmup_steps=0.03, seed=42, data_seed=42,
                         bf16=on_gpu, use_cpu=not on_gpu, report_to="none", save_strategy="no",
                         remove_unused_columns=False, disable_tqdm=True)
result = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
print(json.dumps({"tokens": tokens, "runtime": result.metrics["train_runtime"]}))
'''


def make_model(folder: Path, size: tuple[int, int, int, int]) -> Path:
    """A random Llama of `size` (hidden, layers, heads, ffn) with the tests' tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tinymodel import make_tokenizer

    hidden, layers, heads, ffn = size
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_dataset(path: Path) -> Path:
    words = "the model answers questions about training deploying and serving open language models quickly".split()
    with path.open("w") as f:
        for i in range(600):
            question = " ".join(words[(i + k) % len(words)] for k in range(20 + i % 30))
            answer = " ".join(words[(i * 7 + k) % len(words)] for k in range(40 + i % 60))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def run_ours(home: Path, model_dir: Path, data: Path, device: str, round_number: int) -> float:
    import os

    import engine
    from engine import finetune, jobs
    from engine.hyperparameters import Hyperparameters

    os.environ["MODELDECK_HOME"] = str(home / f"home{round_number}")
    db = engine.start()
    from engine import models

    models.import_path(db, model_dir, "bench-base")
    plan = finetune.plan(db, "bench-base", data, Hyperparameters(**HYPERPARAMETERS), "cpu" if device == "cpu" else "auto")
    model, job = finetune.start(db, plan, "bench-lora")
    while not jobs.get(db, job.id).state.is_terminal():  # polled gently: the bench must not steal the CPU
        jobs.reconcile(db)
        time.sleep(1.0)
    done = models.get_model(db, "bench-lora").model
    if done.state.value != "ready":
        sys.exit(f"modeldeck's fine-tune failed: {done.reason}")
    lineage = json.loads((Path(done.path) / "modeldeck.json").read_text())
    return lineage["train_tokens"] / lineage["train_runtime_s"]


def run_bare(home: Path, model_dir: Path, data: Path, round_number: int) -> float:
    out = subprocess.run([sys.executable, "-c", BARE, str(model_dir), str(data), str(ROOT),
                          json.dumps(HYPERPARAMETERS), str(home / f"bare{round_number}")],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the bare script failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens"] / result["runtime"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    home = fresh_home()
    model_dir = make_model(home / "model", SIZES[args.device])
    data = make_dataset(home / "data.jsonl")
    ours, bare = [], []
    for round_number in range(args.rounds):
        if round_number % 2:
            ours.append(run_ours(home, model_dir, data, args.device, round_number))
            bare.append(run_bare(home, model_dir, data, round_number))
        else:
            bare.append(run_bare(home, model_dir, data, round_number))
            ours.append(run_ours(home, model_dir, data, args.device, round_number))
        print(f"round {round_number + 1}: bare {bare[-1]:,.0f} tok/s, modeldeck {ours[-1]:,.0f} tok/s", flush=True)
    hidden, layers, _, ffn = SIZES[args.device]
    print(f"model: Llama hidden {hidden}, {layers} layers, ffn {ffn}; LoRA r=16 on 7 projections; "
          f"{HYPERPARAMETERS['max_steps']} steps of batch {HYPERPARAMETERS['batch_size']} on {args.device}")
    print(f"bare PEFT + Trainer: median {statistics.median(bare):,.0f} tok/s")
    print(f"modeldeck fine-tune job: median {statistics.median(ours):,.0f} tok/s")
    print(f"tokens/s ratio modeldeck / bare (medians): {statistics.median(ours) / statistics.median(bare):.3f} "
          f"(target ≥ 0.95)")


if __name__ == "__main__":
    main()
