"""Train a small GPT on CPU on the documentation text bundled with Python, with a byte tokenizer.

    python examples/train_gpt.py                 # about 3 minutes on 2 busy CPU cores
    python examples/train_gpt.py --steps 2000 --n-layer 6 --n-embd 192

The text is pydoc_data.topics (the pages `help()` shows; every CPython install has it, so nothing
is downloaded), about 465k bytes; the last 10% is held out for validation. The model is
engine.models.GPT (the engine's kernels where they serve, the plain-torch reference elsewhere),
trained with AdamW, a linear-warmup + cosine learning-rate schedule and gradient clipping.

What to look for: the unigram entropy printed first is the loss of the best model that ignores
context (byte frequencies alone); the validation loss must fall well below it. A sample of
generated text is printed at the end.
"""
import argparse
import os
import sys
import time

# OpenMP worker threads spin while they wait for work (OMP_WAIT_POLICY=ACTIVE, the default). When
# the cores are shared with other busy processes, a spinning thread holds a core that the thread it
# waits for needs, and each parallel region can cost a scheduler time slice: on this project's
# 2-core VM at load average 10, 20 training steps took 107 s with spinning waits and 10 s with
# sleeping ones. So the example asks for sleeping waits unless you set OMP_WAIT_POLICY yourself
# (on an idle machine, ACTIVE may be slightly faster). It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from engine import training  # noqa: E402
from engine.models import GPT, GPTConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128, help="context length in bytes")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=200, help="steps between validation estimates")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--sample-tokens", type=int, default=300, help="bytes generated at the end (0: none)")
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return parser.parse_args(argv)


class ProgressBar:
    """tqdm when it is installed (requirements.txt lists it), else one line rewritten in place."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)
            self._tqdm.update(1)
            return
        width = 30
        filled = width * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text}")
        sys.stderr.flush()

    def write(self, line: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(line)
        else:
            if self.enabled:
                sys.stderr.write("\r\033[K")
            print(line, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled:
            sys.stderr.write("\n")


def sample_tokens(model: GPT, prompt: list, count: int, seed: int) -> list:
    """prompt + `count` sampled tokens (temperature 0.8, top-k 40). The model has no positions
    beyond block_size, so a long sample continues from the last half block each time it fills up."""
    tokens, generator = list(prompt), torch.Generator().manual_seed(seed)
    block = model.config.block_size
    while len(tokens) < len(prompt) + count:
        context = tokens[-(block // 2):] if len(tokens) >= block else tokens
        new = min(block - len(context), len(prompt) + count - len(tokens))
        out = model.generate(torch.tensor([context]), new, temperature=0.8, top_k=40, generator=generator)
        tokens += out[0, len(context):].tolist()
    return tokens


def main(argv=None) -> dict:
    """Runs the training; returns what it measured (losses in nats, the sample, the seconds)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    batches = torch.Generator().manual_seed(args.seed)

    tokenizer = training.ByteTokenizer()
    text = training.stdlib_text()
    data = torch.tensor(tokenizer.encode(text), dtype=torch.uint8)
    train_data, val_data = training.split(data, 0.1)
    baseline = training.unigram_entropy(train_data, tokenizer.vocab_size)
    print(f"data: pydoc_data.topics, {len(text):,} characters -> {data.numel():,} byte tokens "
          f"({train_data.numel():,} train, {val_data.numel():,} validation)")
    print(f"unigram baseline (entropy of the byte frequencies): {baseline:.3f} nats/token")

    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=True)
    model = GPT(config)
    print(f"model: {config}\n       {model.num_parameters() / 1e6:.2f}M parameters")
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, betas=(0.9, 0.99))
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    schedule = training.warmup_cosine_schedule(optimizer, min(warmup, args.steps), args.steps)

    started = time.perf_counter()
    progress = ProgressBar(args.steps, not args.no_progress)
    losses, evals = [], []
    model.train()
    for step in range(args.steps):
        x, y = training.random_batch(train_data, args.batch_size, args.block_size, batches)
        _, loss = model(x, y, return_logits=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - started
        progress.update(f"loss {losses[-1]:.3f} lr {schedule.get_last_lr()[0]:.2e} "
                        f"{(step + 1) * x.numel() / elapsed:,.0f} tok/s")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = training.estimate_loss(model, val_data, args.batch_size, args.block_size, args.eval_batches,
                                         torch.Generator().manual_seed(1))
            evals.append((step + 1, val))
            progress.write(f"step {step + 1}: train loss {sum(losses[-20:]) / len(losses[-20:]):.3f}, "
                           f"validation loss {val:.3f} nats (unigram baseline {baseline:.3f})")
    progress.close()
    seconds = time.perf_counter() - started

    val_loss = evals[-1][1] if evals else float("nan")
    print(f"\ntrained {args.steps} steps in {seconds:.0f} s: first loss {losses[0]:.3f}, validation loss "
          f"{val_loss:.3f} nats vs unigram baseline {baseline:.3f} ({val_loss / baseline:.0%} of it)")
    sample = ""
    if args.sample_tokens > 0:
        sample = tokenizer.decode(sample_tokens(model, tokenizer.encode(args.prompt), args.sample_tokens, args.seed))
        print(f"\nsample (temperature 0.8, top-k 40):\n{'-' * 60}\n{sample}\n{'-' * 60}")
    return {"unigram_entropy": baseline, "losses": losses, "evals": evals, "val_loss": val_loss,
            "seconds": seconds, "sample": sample, "config": config}


if __name__ == "__main__":
    main()
