"""A tiny character-level transformer language model, with perplexity and TensorBoard.

Mirrors the original GPT-2/WikiText2 example of Swift for TensorFlow's
``TrainingLoop``: a causal transformer trained to predict the next token, scored by
``metrics=["perplexity"]`` and watched in TensorBoard through
:class:`~statemachine_loop.callbacks.tensorboard.TensorBoardLogger` (per-batch loss and
learning rate, per-epoch metrics of both phases on shared charts).

Nothing is downloaded: the text is the source code of Python's own ``textwrap``
module (``inspect.getsource``), about 20,000 characters of code and English
docstrings, split 90/10 into training and validation text. Tokens are characters;
the model is an ``nn.TransformerEncoder`` with a causal mask (so each position sees
only the ones before it), which is what a GPT block is. A uniform guess over the
characters scores a perplexity equal to their number (88 on Python 3.11); the model
gets to about 10 on the validation text, then writes a line of pseudo-Python::

    python examples/char_lm_tensorboard.py           # 12 epochs; then
    tensorboard --logdir run/char_lm/tensorboard
    python examples/char_lm_tensorboard.py --smoke   # 1 epoch on 4,000 characters
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Event, TrainingLoop
from statemachine_loop.callbacks.tensorboard import TensorBoardLogger

CONTEXT = 64  # characters the model sees at once


class CharTransformer(nn.Module):
    """Character and position embeddings, a causal transformer encoder, next-character logits."""

    causal_mask: torch.Tensor

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.characters = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(CONTEXT, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        mask = nn.Transformer.generate_square_subsequent_mask(CONTEXT)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, length, vocab)`` for the character after each position."""
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        hidden = self.characters(ids) + self.positions(positions)
        mask = self.causal_mask[:length, :length]
        hidden = self.encoder(hidden, mask=mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(hidden))
        return logits


def next_character_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of every sequence."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def windows(ids: torch.Tensor, stride: int) -> TensorDataset:
    """Inputs of ``CONTEXT`` characters and, as targets, the same window shifted by one."""
    starts = range(0, len(ids) - CONTEXT - 1, stride)
    chunks = torch.stack([ids[start : start + CONTEXT + 1] for start in starts])
    return TensorDataset(chunks[:, :-1], chunks[:, 1:])


@torch.no_grad()
def sample(
    model: CharTransformer, prompt: str, length: int, vocab: str, temperature: float = 0.8
) -> str:
    """Continue ``prompt`` by ``length`` characters, sampling from the model."""
    model.eval()
    index = {character: i for i, character in enumerate(vocab)}
    ids = torch.tensor([[index[c] for c in prompt]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(length):
        logits = model(ids[:, -CONTEXT:])[0, -1] / temperature
        choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, choice.view(1, 1)], dim=1)
    return "".join(vocab[i] for i in ids[0].tolist())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None, help="default 12 (1 with --smoke)")
    parser.add_argument("--out", type=Path, default=None, help="default run/char_lm")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train the language model and return its final validation perplexity."""
    args = parse_args(argv)
    epochs = args.epochs or (1 if args.smoke else 12)
    out = args.out or Path("run/smoke/char_lm" if args.smoke else "run/char_lm")
    torch.manual_seed(args.seed)
    text = inspect.getsource(textwrap)
    vocab = "".join(sorted(set(text)))
    if args.smoke:
        text = text[:4000]
    ids = torch.tensor([vocab.index(c) for c in text])
    cut = len(ids) * 9 // 10
    training = DataLoader(
        windows(ids[:cut], stride=CONTEXT // 2),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    validation = DataLoader(windows(ids[cut:], stride=CONTEXT), batch_size=64)

    def report(loop: TrainingLoop, event: Event) -> None:
        if event is Event.EPOCH_END and loop.history.validation:
            training_ppl = loop.history.training[-1]["perplexity"]
            validation_ppl = loop.history.validation[-1]["perplexity"]
            print(
                f"epoch {loop.epoch_index + 1:>2}/{loop.epoch_count}  perplexity: "
                f"training {training_ppl:.2f}  validation {validation_ppl:.2f}"
            )

    model = CharTransformer(len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    tensorboard = TensorBoardLogger(out / "tensorboard")
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=next_character_loss,
        metrics=["perplexity"],  # from the logits (..., vocab) and the targets (...)
        callbacks=[tensorboard, report],
    )
    print(
        f"{len(text):,} characters of textwrap's source, {len(vocab)} distinct: "
        f"a uniform guess has perplexity {len(vocab)}."
    )
    history = loop.fit(model, epochs=epochs)
    print("sample:", repr(sample(model, "def ", 40 if args.smoke else 160, vocab)))
    print(f"TensorBoard: tensorboard --logdir {tensorboard.logdir}  (run {tensorboard.run_dir})")
    perplexity = history.validation[-1]["perplexity"]
    print(f"final validation perplexity {perplexity:.2f}")
    return perplexity


if __name__ == "__main__":
    main()
