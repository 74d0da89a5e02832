"""Objectives: the scalar output ``Y`` whose sensitivity to each latent we measure.

Every objective maps ``logits [batch, L, vocab]`` for the last ``L`` positions and
``input_ids [batch, pos]`` (left-padded: the last column is each row's last real
token) to one value per row, ``[batch]``. ``keep`` says how many trailing
positions of logits it needs (``None``: all), so the LM head runs only there.
Rows are independent, so one backward pass of ``sum(Y)`` gives every row's
gradient.

* :class:`NextTokenProb` (the paper's): ``p(y* | x)`` at a position, where ``y*``
  is the greedy (argmax) token there: at the last prompt token this is the step
  whose token opens the answer. ``y*`` is taken from the logits it is given
  (detached, so ``dY/dlogits`` treats it as a constant) unless pinned: an exact
  ablation compares ``p_clean(y*) - p_edit(y*)`` with ``y*`` the *clean* run's
  greedy token, so it reads the edited run with :meth:`NextTokenProb.pinned`.
* :class:`TargetLogProb`: ``sum_t log p(x_t | x_<t)`` over the last ``n`` tokens of
  each row (a teacher-forced target continuation appended to the prompt).
* :class:`LabelLogProb`: ``log softmax`` over a set of label tokens at the last
  position, read at each row's gold (or chosen) label.
* :class:`CustomObjective`: any callable ``logits -> scalar or [batch]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from gradsae.errors import GradSAEError


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (keeps float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class NextTokenProb:
    """Probability of the greedy next token at ``position`` (default: the last)."""

    position: int = -1
    """Column of the logits to read; ``-1`` is the last prompt token."""
    log: bool = False
    """Use the log-probability instead of the probability."""
    tokens: int | tuple[int, ...] | None = None
    """Token to read, shared or one per row; ``None``: the greedy token of the logits given."""

    @property
    def keep(self) -> int | None:
        return -self.position if self.position < 0 else None

    def token(self, logits: torch.Tensor) -> torch.Tensor:
        """``[batch]`` token read in each row: the pinned one, else the argmax at ``position``."""
        batch = logits.shape[0]
        if self.tokens is None:
            return _wide(logits[:, self.position]).detach().argmax(dim=-1)
        tokens = torch.as_tensor(self.tokens, dtype=torch.long, device=logits.device).reshape(-1)
        if len(tokens) not in (1, batch):
            raise GradSAEError(f"pinned tokens must be one or one per row ({batch}), got {len(tokens)}")
        return tokens.expand(batch)

    def pinned(self, tokens: int | Sequence[int] | torch.Tensor) -> NextTokenProb:
        """This objective reading ``tokens`` (one, or one per row) whatever the logits say."""
        flat = [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]
        if not flat:
            raise GradSAEError("pinned() needs at least one token: pass one, or one per row")
        return replace(self, tokens=flat[0] if len(flat) == 1 else tuple(flat))

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        step = _wide(logits[:, self.position])
        token = self.token(logits)[:, None]
        logp = step.log_softmax(dim=-1).gather(-1, token).squeeze(-1)
        return logp if self.log else logp.exp()


@dataclass(frozen=True)
class TargetLogProb:
    """Summed log-probability of each row's last ``n_target`` tokens, teacher-forced."""

    n_target: int | tuple[int, ...]
    """Target length, the same for every row or one per row."""

    @property
    def keep(self) -> int | None:
        return max(torch.as_tensor(self.n_target).reshape(-1).tolist()) + 1

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        batch, pos = input_ids.shape
        kept = logits.shape[1]
        lengths = torch.as_tensor(self.n_target, device=input_ids.device).expand(batch)
        if int(lengths.max()) >= min(pos, kept) or int(lengths.min()) < 1:
            raise GradSAEError(f"target length must be between 1 and {pos - 1} tokens, got {lengths.tolist()}")
        targets = input_ids[:, pos - kept + 1 :, None]
        logp = _wide(logits[:, :-1]).log_softmax(dim=-1).gather(-1, targets).squeeze(-1)
        columns = torch.arange(kept - 1, device=input_ids.device)
        in_target = columns[None, :] >= (kept - 1 - lengths)[:, None]
        return (logp * in_target).sum(dim=-1)


@dataclass(frozen=True)
class LabelLogProb:
    """``log p(label | labels)`` at the last position, restricted to the label tokens."""

    label_tokens: tuple[int, ...]
    """First token id of each label's text."""
    target: int | tuple[int, ...]
    """Index into ``label_tokens`` of the label to read, one per row or shared."""

    keep: int | None = 1

    def __post_init__(self) -> None:
        if len(self.label_tokens) < 2:
            raise GradSAEError("LabelLogProb needs at least two label tokens")

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(self.label_tokens, device=logits.device)
        sub = _wide(logits[:, -1])[:, tokens].log_softmax(dim=-1)
        target = torch.as_tensor(self.target, device=logits.device).expand(logits.shape[0])
        return sub.gather(-1, target[:, None]).squeeze(-1)


@dataclass(frozen=True)
class CustomObjective:
    """Wrap a user callable ``logits -> scalar or [batch]``."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    keep: int | None = None

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        value = self.fn(logits)
        if not isinstance(value, torch.Tensor):
            raise GradSAEError("a custom objective must return a torch tensor (scalar or [batch])")
        if value.ndim == 0:
            return value.expand(1)
        return value.reshape(-1)


Objective = NextTokenProb | TargetLogProb | LabelLogProb | CustomObjective


def label_tokens(tokenizer: object, labels: Sequence[str]) -> tuple[int, ...]:
    """First token id of each label as it would follow the prompt; refuse clashes."""
    encode = getattr(tokenizer, "encode")  # noqa: B009
    encoded = [list(encode(label, add_special_tokens=False)) for label in labels]
    for label, tokens in zip(labels, encoded, strict=True):
        if not tokens:
            raise GradSAEError(f"label {label!r} encodes to no tokens: choose labels made of text the tokenizer keeps")
    ids = tuple(int(tokens[0]) for tokens in encoded)
    if len(set(ids)) != len(ids):
        raise GradSAEError(f"labels {list(labels)} share a first token: choose labels that start differently")
    return ids


def objective_from_name(
    name: str,
    *,
    tokenizer: object = None,
    target: str | None = None,
    labels: Sequence[str] = (),
    label: str | None = None,
) -> Objective:
    """Build an objective from CLI words: ``next-token``, ``target``, ``label``."""
    if name in ("next-token", "paper"):
        return NextTokenProb()
    if name == "target":
        if not target:
            raise GradSAEError("objective 'target' needs a continuation: pass --target TEXT")
        n = len(getattr(tokenizer, "encode")(target, add_special_tokens=False))  # noqa: B009
        return TargetLogProb(n_target=n)
    if name == "label":
        if len(labels) < 2 or label is None or label not in labels:
            raise GradSAEError("objective 'label' needs --labels A,B,... and --label one of them")
        return LabelLogProb(label_tokens=label_tokens(tokenizer, labels), target=list(labels).index(label))
    raise GradSAEError(f"unknown objective {name!r}: use next-token, target or label")
