"""A tiny transformer judges sentences acceptable or not, with a warmup-then-decay schedule.

Mirrors the original BERT-CoLA example of Swift for TensorFlow's ``TrainingLoop``:
fine-tuning a transformer encoder on the Corpus of Linguistic Acceptability with a
learning rate that warms up linearly and then decays linearly to zero, scored by the
Matthews correlation coefficient (``metrics=["accuracy", "mcc"]``). The schedule is
the original's, built from segments::

    Schedule([Segment("linear", start=0, end=peak, steps=warmup + 1), Segment("linear", end=0)])

and :class:`~statemachine_loop.callbacks.schedule.LearningRateScheduler` fills the
open last segment with the fit's length and sets the rate before every training
batch.

CoLA is not downloaded. The script generates its own acceptability task from a small
grammar ("the clever dogs chase a cat near the river"), about 30 % of the sentences
made unacceptable, as in CoLA, by one of three errors: a verb that disagrees with its
subject ("the dogs chases"), a determiner that disagrees with its noun ("a dogs"), or
two neighbouring words swapped. A bag of words cannot see any of them; the model has
to attend to word order. With unbalanced classes, MCC says more than accuracy: always
answering "acceptable" scores 0.7 accuracy but 0 MCC::

    python examples/text_classifier_schedule.py           # 10 epochs
    python examples/text_classifier_schedule.py --smoke   # 2 epochs on 256 sentences
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Event, TrainingLoop
from statemachine_loop.callbacks.schedule import LearningRateScheduler
from statemachine_loop.schedules import Schedule, Segment

SINGULAR_DETERMINERS = ("a", "this", "every", "one")
PLURAL_DETERMINERS = ("these", "some", "many", "two")
NOUNS = (
    ("dog", "dogs"),
    ("cat", "cats"),
    ("teacher", "teachers"),
    ("student", "students"),
    ("bird", "birds"),
    ("child", "children"),
    ("farmer", "farmers"),
    ("friend", "friends"),
)
VERBS = (
    ("chases", "chase"),
    ("sees", "see"),
    ("likes", "like"),
    ("helps", "help"),
    ("follows", "follow"),
    ("visits", "visit"),
)
ADJECTIVES = ("small", "old", "happy", "clever", "quiet", "tired")
PLACES = ("", "in the park", "near the river", "after school", "at home")
PAD = "<pad>"
MAX_WORDS = 16
UNACCEPTABLE = 0.3


def noun_phrase(rng: random.Random, plural: bool) -> list[str]:
    """A determiner, maybe an adjective, and a noun, all agreeing in number."""
    determiner = rng.choice(("the", *(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)))
    adjective = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
    return [determiner, *adjective, rng.choice(NOUNS)[plural]]


def sentence(rng: random.Random) -> tuple[list[str], int]:
    """One sentence and its label: 1 acceptable, 0 not."""
    subject_plural, object_plural = rng.random() < 0.5, rng.random() < 0.5
    subject = noun_phrase(rng, subject_plural)
    verb = rng.choice(VERBS)[subject_plural]
    words = [*subject, verb, *noun_phrase(rng, object_plural), *rng.choice(PLACES).split()]
    if rng.random() >= UNACCEPTABLE:
        return words, 1
    error = rng.randrange(3)
    if error == 0:  # the verb disagrees with its subject
        words[len(subject)] = rng.choice(VERBS)[not subject_plural]
    elif error == 1:  # the subject's determiner disagrees with its noun
        words[0] = rng.choice(SINGULAR_DETERMINERS if subject_plural else PLURAL_DETERMINERS)
    else:  # two neighbouring words swapped (never two equal ones)
        positions = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
        i = rng.choice(positions)
        words[i], words[i + 1] = words[i + 1], words[i]
    return words, 0


def vocabulary() -> dict[str, int]:
    """Every word of the grammar, with id 0 for padding."""
    words = {PAD, "the", *SINGULAR_DETERMINERS, *PLURAL_DETERMINERS, *ADJECTIVES}
    words |= {word for pair in (*NOUNS, *VERBS) for word in pair}
    words |= {word for place in PLACES for word in place.split()}
    return {word: index for index, word in enumerate(sorted(words, key=lambda w: w != PAD))}


def make_dataset(count: int, rng: random.Random, vocab: dict[str, int]) -> TensorDataset:
    """``count`` sentences as padded word ids ``(count, MAX_WORDS)`` and float labels."""
    ids = torch.zeros(count, MAX_WORDS, dtype=torch.long)
    labels = torch.zeros(count)
    for row in range(count):
        words, label = sentence(rng)
        ids[row, : len(words)] = torch.tensor([vocab[word] for word in words])
        labels[row] = label
    return TensorDataset(ids, labels)


class AcceptabilityClassifier(nn.Module):
    """Word and position embeddings, a small transformer encoder, mean pooling, one logit."""

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, width, padding_idx=0)
        self.positions = nn.Embedding(MAX_WORDS, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == 0
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.encoder(
            self.words(ids) + self.positions(positions), src_key_padding_mask=padding
        )
        keep = (~padding).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * keep).sum(1) / keep.sum(1)
        logits: torch.Tensor = self.head(pooled)
        return logits.squeeze(-1)  # one logit per sentence: >= 0 is "acceptable"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (2 with --smoke)")
    parser.add_argument("--peak", type=float, default=2e-3, help="the schedule's peak rate")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train the classifier and return its final validation MCC."""
    args = parse_args(argv)
    epochs = args.epochs or (2 if args.smoke else 10)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    vocab = vocabulary()
    train_size, valid_size = (256, 128) if args.smoke else (4000, 1000)
    training = DataLoader(
        make_dataset(train_size, rng, vocab),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    validation = DataLoader(make_dataset(valid_size, rng, vocab), batch_size=256)

    # The original: warm up over the first 10% of the steps, then decay linearly to 0.
    total_steps = epochs * len(training)
    warmup = max(1, total_steps // 10)
    schedule = Schedule(
        [Segment("linear", start=0, end=args.peak, steps=warmup + 1), Segment("linear", end=0)]
    )
    scheduler = LearningRateScheduler(schedule)

    def report(loop: TrainingLoop, event: Event) -> None:
        if event is Event.EPOCH_END and loop.history.validation:
            values = loop.history.validation[-1]
            print(
                f"epoch {loop.epoch_index + 1:>2}/{loop.epoch_count}  lr {scheduler.lr:.2e}  "
                f"validation loss {values['loss']:.4f}  accuracy {values['accuracy']:.4f}  "
                f"mcc {values['mcc']:.4f}"
            )

    model = AcceptabilityClassifier(len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.peak, weight_decay=0.01)
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.binary_cross_entropy_with_logits,  # float labels, one logit each
        metrics=["accuracy", "mcc"],
        callbacks=[scheduler, report],
    )
    example, label = sentence(random.Random(1))
    print(f'{train_size} generated sentences, e.g. "{" ".join(example)}" ({label})')
    filled = schedule.with_total_steps(total_steps)
    print(
        f"learning rate: 0 at step 0, {filled(warmup):.1e} at step {warmup}, "
        f"{filled(total_steps - 1):.0f} at step {total_steps - 1}"
    )
    history = loop.fit(model, epochs=epochs)
    final = history.validation[-1]
    print(f"final validation mcc {final['mcc']:.4f}, accuracy {final['accuracy']:.4f}")
    return final["mcc"]


if __name__ == "__main__":
    main()
