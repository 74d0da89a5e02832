"""``gradsae score``: one prompt, its top latents by GradSAE beside its top latents by activation.

Columns: latent id, mean activation over the prompt's positions, GradSAE
influence (the chosen aggregation of ``H * dY/dH``), the latent's rank under the
other method, and (with ``--ablation``) the exact effect of zeroing it; then the
tokens each latent's decoder direction raises most (the logit lens of
:func:`gradsae.lens.logit_lens`). The header names the token the
objective reads. ``--methods ig,relp,ablation,...`` ranks by the first estimator named and
shows each one's score (:mod:`gradsae.estimators`; ``ablation`` is the exact oracle), then
every method's ranking side by side (with the exact one: each top-K set's recall of the
exact top-K); ``--baseline`` says what a removed latent is set to (``--corrupt`` gives
the counterfactual prompt). ``--html FILE`` also writes one self-contained page: the
prompt's tokens coloured by a latent's per-token score, every method's top list (a select
chooses the one shown), and (``--cards``) cards.

``--layers 6,15,24`` scores the SAEs of several layers from one forward and one backward
(:func:`gradsae.multilayer.score_layers`, error mode) and prints one GradSAE ranking across
them, latents named ``L<layer>/<index>``; it supports ``--methods gradsae`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradsae import _files, distributed
from gradsae.cli import options, validate
from gradsae.cli.common import parse_layers
from gradsae.cli.plan import add_plan_argument, score_plan
from gradsae.errors import GradSAEError
from gradsae.estimators import BASELINES, ESTIMATORS, IG_STEPS, Baseline, logit_diff, mean_activations
from gradsae.experiments.cards import corpus_tokens
from gradsae.experiments.record import record_scores
from gradsae.experiments.results import LayerExamples
from gradsae.lens import logit_lens
from gradsae.models import LoadedModel, load_model, position_ids, sae_device
from gradsae.multilayer import rank_across_layers, score_layers
from gradsae.objectives import Objective, objective_from_name
from gradsae.pretrained import ResolvedSAE, is_version_spec, resolve_sae, resolve_saes
from gradsae.report.html import score_page
from gradsae.sae import SAE, check_compatible
from gradsae.scores import ScoreOptions, Scores, score_methods
from gradsae.splice import splice

SCORE_METHODS = ("gradsae", *ESTIMATORS, "ablation")
"""``--methods``: the estimators and the exact ablation oracle."""
LAYER_METHODS = ("gradsae",)
"""``--methods`` with ``--layers``: what :func:`gradsae.multilayer.score_layers` computes."""


@dataclass(frozen=True)
class ScoreRow:
    """One latent in the table."""

    latent: int
    activation: float
    influence: float
    rank_gradsae: int | None
    """Rank under the first of ``--methods`` (GradSAE by default)."""
    rank_activation: int | None
    ablation: float | None
    others: dict[str, float] = dataclasses.field(default_factory=dict)
    """Score under each further method of ``--methods``."""
    lens: tuple[str, ...] = ()
    """Tokens the latent's decoder direction raises most (logit lens)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradsae score``."""
    options.model_arguments(parser)
    add_score_arguments(parser)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="What is the capital of France?", help="the input text")
    parser.add_argument(
        "--prompts",
        default=None,
        help="score many prompts: a text file (one per line) or JSONL with a prompt field; under torchrun "
        "the prompts are shared among the ranks and rank 0 writes --json",
    )
    parser.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    parser.add_argument(
        "--objective",
        default="next-token",
        choices=["next-token", "target", "label", "logit-diff"],
        help="next-token: p(greedy next token) (the paper's); target: log p(--target | prompt); "
        "label: log p(--label | --labels) at the next token; logit-diff: logit(clean greedy token) - "
        "logit(--corrupt's greedy token) (feature-circuits' metric)",
    )
    parser.add_argument("--target", default=None, help="continuation for --objective target")
    parser.add_argument("--labels", default="", help="comma-separated label words for --objective label")
    parser.add_argument("--label", default=None, help="the label to score for --objective label")
    options.mode(parser, default="error")
    parser.add_argument(
        "--aggregation",
        default="paper",
        choices=["paper", "signed", "abs", "sum", "last"],
        help="how per-token influence becomes per-latent (paper: mean of positive parts)",
    )
    parser.add_argument(
        "--methods",
        default="gradsae",
        help=f"comma list of estimators, any of {', '.join(SCORE_METHODS)}: the first ranks the table, each gets a "
        "column and a ranking side by side (ig: integrated gradients; relp: RelP propagation, see "
        "gradsae.estimators; ablation: the exact effect, one forward per active latent)",
    )
    options.layers(
        parser,
        default=None,
        help="score the SAEs of several layers (e.g. 6,15,24; --sae with {layer}, or the shipped ones) from one "
        "forward and one backward, error mode, and rank their latents together as L<layer>/<index> (GradSAE only)",
    )
    options.ig_steps(parser, default=IG_STEPS)
    parser.add_argument(
        "--baseline",
        default="zero",
        choices=list(BASELINES),
        help="what a removed latent is set to: zero; mean (its mean activation over the held-out news corpus); "
        "counterfactual (its value on --corrupt); every estimator and --ablation use it",
    )
    parser.add_argument(
        "--corrupt", default=None, help="corrupted prompt of the same token length (--baseline counterfactual)"
    )
    parser.add_argument("--lens", type=int, default=3, help="logit-lens tokens shown per latent (0: none)")
    parser.add_argument("--top", type=int, default=10, help="rows in the table")
    parser.add_argument("--ablation", action="store_true", help="also compute the exact ablation effect")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")
    parser.add_argument("--html", default=None, help="also write a self-contained HTML page to this file")
    parser.add_argument("--cards", default=None, help="feature cards JSON (`gradsae cards`) to show in the --html page")
    add_plan_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, score, print the report; then write ``--json`` (rank 0 only under torchrun)."""
    check_arguments(args)
    if getattr(args, "plan", False):
        if distributed.is_main():
            sys.stdout.write(score_plan(args, lambda lm: prompt_tokens(lm, args)))
        return 0
    report, table = run_score_layers(args) if args.layers else run_score(args)
    if distributed.is_main():
        sys.stdout.write(report)
        sys.stdout.flush()
        if args.json:
            _files.write_json(args.json, table, sort_keys=False)
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """Scoring writes nothing until it is done."""
    return "nothing was written; run the command again"


def prompt_tokens(lm: LoadedModel, args: argparse.Namespace) -> list[int]:
    """Tokens each prompt of ``--prompt`` / ``--prompts`` is scored on (the chat template and ``--target`` included)."""
    counts = []
    for prompt in read_prompts(args.prompts) if args.prompts else [args.prompt]:
        ids, _mask, _text = encode_one(lm, prompt, chat=not args.no_chat)
        if args.objective == "target":
            ids, _ = append_target(lm, ids, args.target)
        counts.append(int(ids.shape[1]))
    return counts


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse any bad argument, input path or output file before a model loads."""
    if args.layers is not None:
        check_layers_arguments(args)
        return
    if args.prompts is None:
        validate.text("--prompt", args.prompt, fix="pass --prompt TEXT")
    elif args.html:
        raise GradSAEError("--html shows one prompt: drop --prompts (score one --prompt) or drop --html")
    else:
        read_prompts(args.prompts)
    validate.at_least("--top", args.top, 1)
    validate.at_least("--ig-steps", args.ig_steps, 1)
    validate.at_least("--lens", args.lens, 0)
    parse_methods(args.methods)
    needs_corrupt = args.baseline == "counterfactual" or args.objective == "logit-diff"
    if needs_corrupt and args.corrupt is None:
        raise GradSAEError("--baseline counterfactual and --objective logit-diff need --corrupt TEXT: pass one")
    if args.corrupt is not None:
        if not needs_corrupt:
            raise GradSAEError("--corrupt applies to --baseline counterfactual or --objective logit-diff: drop it")
        if args.prompts is not None:
            raise GradSAEError("--corrupt pairs with one --prompt: drop --prompts")
        validate.text("--corrupt", args.corrupt, fix="pass the corrupted prompt with --corrupt TEXT")
    validate.at_least("--layer", args.layer, 0)
    check_objective_options(args)
    validate.model_and_device(args.model, args.device, args.device_map)
    validate.layers([args.layer], args.model, option="--layer")
    validate.sae_folders(args.sae, [args.layer])
    validate.out_file(args.json, option="--json")


def check_objective_options(args: argparse.Namespace) -> None:
    """Each objective's options are given, and only its own."""
    labels = label_words(args.labels)
    if args.objective == "target":
        if args.target is None:
            raise GradSAEError("--objective target needs a continuation: pass --target TEXT")
        validate.text("--target", args.target, fix="pass the continuation to score with --target TEXT")
    elif args.target is not None:
        raise GradSAEError("--target applies to --objective target only: drop it or pass --objective target")
    if args.objective == "label":
        if len(labels) < 2 or args.label not in labels:
            raise GradSAEError("--objective label needs --labels A,B,... and --label one of them: pass both")
        if len(set(labels)) < len(labels):
            raise GradSAEError(f"--labels {args.labels!r} names a label twice: list each label once")
    elif args.labels or args.label is not None:
        raise GradSAEError("--labels and --label apply to --objective label only: drop them or pass --objective label")


def parse_methods(text: str) -> tuple[str, ...]:
    """``--methods``: a comma list of :data:`SCORE_METHODS`, each once."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods or any(m not in SCORE_METHODS for m in methods) or len(set(methods)) < len(methods):
        raise GradSAEError(f"--methods {text!r}: use a comma list of {', '.join(SCORE_METHODS)}, each once")
    return methods


def label_words(text: str) -> list[str]:
    """``--labels`` as a list of words."""
    return [word.strip() for word in text.split(",") if word.strip()]


@dataclass(frozen=True)
class Scored:
    """One prompt's result, as gathered from the rank that scored it."""

    text: str
    """The text the model read (the prompt, in the chat template unless ``--no-chat``)."""
    grad: Scores
    rows: list[ScoreRow]
    page: dict[str, Any] | None
    """The ``--html`` page's data (:class:`LayerExamples` as a dict), when asked for."""
    rankings: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    """Method -> its top ``--top`` ``(latent, score)``, best first (every method scored)."""


def run_score(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Load, score every prompt (sharded over torchrun's ranks); return the printable report and the JSON data."""
    start = time.perf_counter()
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    sae, layer, label = resolve_sae(lm, args.sae, args.layer)
    sae = sae.to(sae_device(lm, layer, sae.cfg.hook_point))
    check_compatible(sae, d_model=lm.d_model, n_layers=lm.n_layers, layer=layer)
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    scored = distributed.map_items(lambda prompt: score_prompt(lm, sae, layer, args, prompt), prompts)
    seconds = time.perf_counter() - start
    reports = [
        _header(lm, label, layer, args, p, one.text, one.grad, seconds) for p, one in zip(prompts, scored, strict=True)
    ]
    tables = [
        format_table(one.rows, args.top, parse_methods(args.methods)[0]) + rankings_table(one.rankings, args.top)
        for one in scored
    ]
    if args.html and distributed.is_main():
        page = scored[0].page
        assert page is not None
        cards = _files.read_json(args.cards) if args.cards else None
        summary = reports[0] + "\n\n" + tables[0]
        _files.write_text(args.html, score_page(f"gradsae score: {lm.name}, layer {layer}", summary, page, cards))
    if args.prompts:
        entries = [_entry(p, one) for p, one in zip(prompts, scored, strict=True)]
        data: dict[str, Any] = {"layer": layer, "sae": label, "prompts": entries}
    else:
        data = {"header": reports[0], "rows": [r.__dict__ for r in scored[0].rows], "rankings": scored[0].rankings}
    return "\n\n".join(header + "\n\n" + table for header, table in zip(reports, tables, strict=True)), data


def score_prompt(lm: LoadedModel, sae: SAE, layer: int, args: argparse.Namespace, prompt: str) -> Scored:
    """One prompt: the text the model read, its scores, the table's rows (and the page's data)."""
    ids, mask, text = encode_one(lm, prompt, chat=not args.no_chat)
    corrupt = None if args.corrupt is None else encode_one(lm, args.corrupt, chat=not args.no_chat)[0]
    if corrupt is not None and corrupt.shape != ids.shape:
        raise GradSAEError(
            f"--corrupt has {corrupt.shape[1]} tokens, the prompt {ids.shape[1]}: give a corrupted prompt of the "
            "same token length (change a word for one of the same length)"
        )
    if args.objective == "logit-diff":
        assert corrupt is not None
        objective = logit_diff_objective(lm, sae, ids, mask, corrupt, layer=layer, mode=args.mode)
    else:
        objective = objective_from_name(
            args.objective,
            tokenizer=lm.tokenizer,
            target=args.target,
            labels=label_words(args.labels),
            label=args.label,
        )
    if args.objective == "target":
        ids, mask = append_target(lm, ids, args.target)
    methods = parse_methods(args.methods)
    options = ScoreOptions(
        layer=layer,
        mode=args.mode,
        aggregation=args.aggregation,
        ig_steps=args.ig_steps,
        baseline=removal_baseline(lm, sae, layer, args, corrupt),
    )
    asked = tuple(dict.fromkeys((*methods, "activation") + (("ablation",) if args.ablation else ())))
    by = score_methods(lm, sae, ids, mask, objective, methods=asked, options=options)
    grad, act = by[methods[0]], by["activation"]
    page = None
    if args.html:
        record = record_scores(lm.tokenizer, ids, mask, by, top=args.top)
        page = dataclasses.asdict(LayerExamples(layer=layer, examples=(record,)))
    others = {m: by[m] for m in methods[1:] if m != "ablation"}  # the exact effect has its own column
    exact = None if methods[0] == "ablation" else by.get("ablation")  # ranked by it: its column is the score
    rows = table_rows(grad, act, exact, args.top, others=others)
    if args.lens:
        rows = with_lens(lm, sae, rows, args.lens)
    return Scored(text=text, grad=grad, rows=rows, page=page, rankings=top_lists(by, args.top))


def logit_diff_objective(
    lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, corrupt: torch.Tensor, *, layer: int, mode: str
) -> Objective:
    """``logit(clean greedy token) - logit(corrupted greedy token)`` at the last position (spliced model)."""
    tokens = []
    for prompt in (ids, corrupt):
        with splice(lm, sae, layer, mode=mode, record=False), torch.no_grad():  # type: ignore[arg-type]
            out = lm.model(input_ids=prompt, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1)
        tokens.append(int(out.logits[0, -1].argmax()))
    if tokens[0] == tokens[1]:
        raise GradSAEError(
            f"the clean and corrupted prompts both continue with {lm.tokenizer.decode([tokens[0]])!r}: choose a "
            "corrupted prompt whose answer differs"
        )
    return logit_diff(tokens[0], tokens[1])


def removal_baseline(
    lm: LoadedModel, sae: SAE, layer: int, args: argparse.Namespace, corrupt: torch.Tensor | None
) -> Baseline:
    """``--baseline`` as a :class:`Baseline` (the mean over 32 held-out news sequences of 128 tokens)."""
    if args.baseline == "counterfactual":
        return Baseline("counterfactual", corrupt_ids=corrupt)
    if args.baseline == "mean":
        corpus = corpus_tokens(lm.tokenizer, None, n_sequences=32, context=128).to(lm.device)
        return Baseline("mean", mean=mean_activations(lm, sae, corpus, layer=layer))
    return Baseline()


def with_lens(lm: LoadedModel, sae: SAE, rows: list[ScoreRow], n: int) -> list[ScoreRow]:
    """Each row with the ``n`` tokens its latent's decoder direction raises most."""
    if not rows:
        return rows
    lens, _note = logit_lens(lm, sae, [r.latent for r in rows])
    best = lens.topk(min(n, lens.shape[1]), dim=1).indices.tolist()
    words = [tuple(lm.tokenizer.decode([t]) for t in tokens) for tokens in best]
    return [dataclasses.replace(r, lens=w) for r, w in zip(rows, words, strict=True)]


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a text file, or the ``prompt`` field of each JSONL line."""
    file = Path(path)
    if not file.is_file():
        raise GradSAEError(f"prompt file {file} does not exist: pass a text file with one prompt per line")
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise GradSAEError(f"cannot read prompt file {file} ({type(exc).__name__}): pass a UTF-8 text file") from None
    if not lines:
        raise GradSAEError(f"prompt file {file} holds no prompt: write one prompt per line")
    if file.suffix != ".jsonl":
        return lines
    try:
        prompts = [json.loads(line)["prompt"] for line in lines]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise GradSAEError(f'{file}: every JSONL line needs a "prompt" field') from None
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise GradSAEError(f'{file}: every "prompt" must be non-empty text')
    return prompts


def _entry(prompt: str, one: Scored) -> dict[str, object]:
    """One prompt's result in the ``--prompts`` JSON (no timings: the same for any number of ranks)."""
    return {
        "prompt": prompt,
        "chat": one.text != prompt,
        "objective": float(one.grad.objective[0]),
        "active_last": int(one.grad.active_last[0]),
        "rows": [r.__dict__ for r in one.rows],
    }


def encode_one(lm: LoadedModel, prompt: str, *, chat: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Token ids of one prompt, through the chat template when the tokenizer has one."""
    if not prompt.strip():
        raise GradSAEError("the prompt is empty: pass --prompt TEXT")
    tok = lm.tokenizer
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        text = prompt
        enc = tok(text, return_tensors="pt")
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit and enc["input_ids"].shape[1] > limit:
        raise GradSAEError(f"the prompt has {enc['input_ids'].shape[1]} tokens, over the model's {limit}: shorten it")
    return enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device), text


def append_target(lm: LoadedModel, ids: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    extra = torch.as_tensor([lm.tokenizer.encode(target, add_special_tokens=False)], device=ids.device)
    full = torch.cat([ids, extra], dim=1)
    return full, torch.ones_like(full)


def table_rows(
    grad: Scores, act: Scores, abl: Scores | None, top: int, *, others: dict[str, Scores] | None = None
) -> list[ScoreRow]:
    """The union of both methods' top latents, in ``grad``'s order then activation order."""
    g_rank = {int(c): i + 1 for i, c in enumerate(grad.ranking(0))}
    a_rank = {int(c): i + 1 for i, c in enumerate(act.ranking(0))}
    chosen = list(grad.ranking(0)[:top].tolist())
    chosen += [c for c in act.ranking(0)[:top].tolist() if c not in chosen]
    return [
        ScoreRow(
            latent=c,
            activation=float(act.per_latent[0, c]),
            influence=float(grad.per_latent[0, c]),
            rank_gradsae=g_rank.get(c),
            rank_activation=a_rank.get(c),
            ablation=None if abl is None else float(abl.per_latent[0, c]),
            others={m: float(s.per_latent[0, c]) for m, s in (others or {}).items()},
        )
        for c in chosen
    ]


METHOD_NAMES = {"gradsae": "GradSAE", "ig": "integrated gradients", "relp": "RelP", "ablation": "exact ablation"}


def format_table(rows: list[ScoreRow], top: int, method: str = "gradsae") -> str:
    """Two side-by-side markdown tables: top by ``method`` (GradSAE by default), top by activation."""
    name = METHOD_NAMES.get(method, method)
    by_grad = sorted([r for r in rows if r.rank_gradsae and r.rank_gradsae <= top], key=lambda r: r.rank_gradsae or 0)
    by_act = sorted(
        [r for r in rows if r.rank_activation and r.rank_activation <= top], key=lambda r: r.rank_activation or 0
    )
    ablate = any(r.ablation is not None for r in rows)
    extra = list(rows[0].others) if rows else []
    lens = any(r.lens for r in rows)
    head = (
        f"| rank | latent | mean act | {name} {'influence' if method == 'gradsae' else 'score'} | rank by {{other}} |"
        + "".join(f" {METHOD_NAMES.get(m, m)} |" for m in extra)
        + (" exact ablation |" if ablate else "")
        + (" logit lens (raises) |" if lens else "")
    )
    rule = "|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + ("---:|" if ablate else "") + ("---|" if lens else "")
    out = []
    for title, part, other in (
        (f"Top latents by {name}", by_grad, "activation"),
        ("Top latents by activation (input side)", by_act, name),
    ):
        out += [f"## {title}", "", head.format(other=other), rule]
        for i, r in enumerate(part, 1):
            other_rank = r.rank_activation if other == "activation" else r.rank_gradsae
            line = f"| {i} | {r.latent} | {r.activation:.4g} | {r.influence:.4g} | {other_rank or '-'} |"
            line += "".join(f" {r.others[m]:.4g} |" for m in extra)
            line += f" {r.ablation:.4g} |" if ablate and r.ablation is not None else ""
            line += f" {' '.join(repr(w) for w in r.lens)} |" if lens else ""
            out.append(line)
        out.append("")
    overlap = len({r.latent for r in by_grad} & {r.latent for r in by_act})
    out.append(f"Overlap of the two top-{top} sets: {overlap}/{top}.")
    return "\n".join(out) + "\n"


def _header(
    lm: LoadedModel,
    label: str,
    layer: int,
    args: argparse.Namespace,
    prompt: str,
    text: str,
    grad: Scores,
    seconds: float,
) -> str:
    n_tokens = int(grad.token_index[:, 1].max()) + 1 if len(grad.token_index) else 0
    return "\n".join(
        [
            f"# gradsae score: {lm.name}, layer {layer}",
            f"- SAE: {label}",
            f"- objective: {objective_words(lm, args, grad)} (Y = {float(grad.objective[0]):.4g}); "
            f"splice mode: {args.mode}; aggregation: {args.aggregation}",
            f"- estimator: {', '.join(parse_methods(args.methods))}"
            + (f" ({args.ig_steps} steps)" if "ig" in args.methods else "")
            + f"; removal baseline: {args.baseline}",
            f"- prompt: {prompt!r} ({n_tokens} tokens{' with chat template' if text != prompt else ''})",
            f"- latents active at the last token: {int(grad.active_last[0])}; wall time {seconds:.1f} s",
        ]
    )


def objective_words(lm: LoadedModel, args: argparse.Namespace, grad: Scores) -> str:
    """The objective with the token it reads, e.g. ``next-token p(' Paris')``."""
    if args.objective == "next-token" and grad.token is not None:
        return f"next-token p({lm.tokenizer.decode([int(grad.token[0])])!r})"
    if args.objective == "target":
        return f"target log p({args.target!r} | prompt)"
    if args.objective == "label":
        return f"label log p({args.label!r} | {', '.join(label_words(args.labels))})"
    if args.objective == "logit-diff":
        return f"logit-diff vs the greedy answer to {args.corrupt!r}"
    return str(args.objective)


# -- every method's ranking side by side ----------------------------------------------------------
def top_lists(by: dict[str, Scores], top: int) -> dict[str, list[tuple[int, float]]]:
    """Method -> its ``top`` best ``(latent, score)`` of row 0 (positive scores only), in ``by``'s order."""
    return {m: [(int(c), float(s.per_latent[0, c])) for c in s.ranking(0)[:top].tolist()] for m, s in by.items()}


def rankings_table(lists: dict[str, list[tuple[int, float]]], top: int) -> str:
    """Every method's top list in one markdown table, one column per method (``latent (score)``), then each
    list's overlap with the first's and, when the exact ``ablation`` is among them, its recall of the exact
    top-``top``. Empty with a single method."""
    if len(lists) < 2:
        return ""
    names = list(lists)
    out = ["", "## Rankings side by side", "", "| rank | " + " | ".join(METHOD_NAMES.get(m, m) for m in names) + " |"]
    out.append("|---:|" + "---:|" * len(names))
    for i in range(max(len(rows) for rows in lists.values())):
        cells = [f"{rows[i][0]} ({rows[i][1]:.3g})" if i < len(rows) else "-" for rows in lists.values()]
        out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    first = {c for c, _ in lists[names[0]]}
    shared = ", ".join(f"{METHOD_NAMES.get(m, m)} {len(first & {c for c, _ in lists[m]})}" for m in names[1:])
    out += ["", f"Shared with the {METHOD_NAMES.get(names[0], names[0])} top-{top}: {shared}."]
    if "ablation" in lists:
        exact = {c for c, _ in lists["ablation"]}
        recall = ", ".join(
            f"{METHOD_NAMES.get(m, m)} {len(exact & {c for c, _ in rows})}/{len(exact)}"
            for m, rows in lists.items()
            if m != "ablation"
        )
        out.append(f"Recall of the exact top-{top} (ablation): {recall}.")
    return "\n".join(out) + "\n"


# -- --layers: every layer in one backward ---------------------------------------------------------
@dataclass(frozen=True)
class LayerRow:
    """One latent of the ranking across layers."""

    id: str
    """``L<layer>/<index>``."""
    layer: int
    latent: int
    activation: float
    """Mean activation over the prompt's spliced positions."""
    influence: float
    """GradSAE score (the chosen aggregation of ``H * dY/dH``)."""
    rank_in_layer: int
    """Its rank among the latents of its own layer."""
    lens: tuple[str, ...] = ()
    """Tokens the latent's decoder direction raises most (logit lens)."""


def check_layers_arguments(args: argparse.Namespace) -> None:
    """``--layers``: its layers and SAEs, and only the options :func:`gradsae.multilayer.score_layers` supports."""
    parse_layers(args.layers)
    methods = parse_methods(args.methods)
    refused = (
        (args.layer is not None, "--layers and --layer both name layers: pass one of them"),
        (
            any(m not in LAYER_METHODS for m in methods),
            f"--methods {args.methods} with --layers: one backward for every layer scores "
            f"{', '.join(LAYER_METHODS)} only: drop --methods or --layers",
        ),
        (args.ablation, "--ablation with --layers: the exact effect is per layer: drop --ablation or --layers"),
        (args.mode != "error", "--layers splices every SAE in error mode (the model stays exact): drop --mode"),
        (args.baseline != "zero", "--baseline with --layers: latents are removed to zero there: drop --baseline"),
        (args.objective == "logit-diff", "--objective logit-diff with --layers: use next-token, target or label"),
        (args.corrupt is not None, "--corrupt with --layers: drop it"),
        (args.prompts is not None, "--layers scores one --prompt: drop --prompts"),
        (args.html is not None or args.cards is not None, "--html shows one layer: drop --html and --cards"),
        (getattr(args, "plan", False), "--plan covers one --layer: drop --layers to plan"),
        (
            args.sae is not None and "{layer}" not in args.sae and not is_version_spec(args.sae),
            f"--sae {args.sae} is one SAE for every layer: put {{layer}} in its path (e.g. saes/layer_{{layer}})",
        ),
    )
    for bad, message in refused:
        if bad:
            raise GradSAEError(message)
    validate.text("--prompt", args.prompt, fix="pass --prompt TEXT")
    validate.at_least("--top", args.top, 1)
    validate.at_least("--lens", args.lens, 0)
    check_objective_options(args)
    validate.model_and_device(args.model, args.device, args.device_map)
    validate.layers(parse_layers(args.layers), args.model, option="--layers")
    validate.sae_folders(args.sae, parse_layers(args.layers))
    validate.out_file(args.json, option="--json")


def run_score_layers(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``--layers``: every layer's SAE scored from one forward and one backward; one ranking across layers."""
    start = time.perf_counter()
    lm = load_model(args.model, device=args.device, device_map=args.device_map)
    found = resolve_saes(lm, args.sae, list(parse_layers(args.layers)))
    saes = {f.layer: f.sae.to(sae_device(lm, f.layer, f.sae.cfg.hook_point)) for f in found}
    ids, mask, text = encode_one(lm, args.prompt, chat=not args.no_chat)
    objective = objective_from_name(
        args.objective, tokenizer=lm.tokenizer, target=args.target, labels=label_words(args.labels), label=args.label
    )
    if args.objective == "target":
        ids, mask = append_target(lm, ids, args.target)
    by_layer = score_layers(lm, saes, ids, mask, objective, aggregation=args.aggregation)
    rows = layer_rows(lm, saes, by_layer, args.top, args.lens)
    header = _layers_header(lm, found, args, text, by_layer, time.perf_counter() - start)
    data = {"header": header, "layers": list(saes), "rows": [r.__dict__ for r in rows]}
    return header + "\n\n" + format_layer_table(rows, args.top, list(saes)), data


def layer_rows(
    lm: LoadedModel, saes: dict[int, SAE], by_layer: dict[int, Scores], top: int, lens: int
) -> list[LayerRow]:
    """The ``top`` best latents of every layer together, best first, with their lens tokens."""
    in_layer = {(layer, int(c)): i + 1 for layer, s in by_layer.items() for i, c in enumerate(s.ranking(0).tolist())}
    best = rank_across_layers(by_layer)[:top]
    words: dict[tuple[int, int], tuple[str, ...]] = {}
    for layer in saes:
        mine = [c for lay, c, _ in best if lay == layer]
        words |= {(layer, c): w for c, w in zip(mine, lens_words(lm, saes[layer], mine, lens), strict=True)}
    return [
        LayerRow(
            id=f"L{layer}/{c}",
            layer=layer,
            latent=c,
            activation=float(by_layer[layer].mean_act[0, c]),
            influence=score,
            rank_in_layer=in_layer[(layer, c)],
            lens=words.get((layer, c), ()),
        )
        for layer, c, score in best
    ]


def lens_words(lm: LoadedModel, sae: SAE, latents: list[int], n: int) -> list[tuple[str, ...]]:
    """The ``n`` tokens each latent's decoder direction raises most (none when ``n`` is 0 or no latent)."""
    if not latents or not n:
        return [() for _ in latents]
    lens, _note = logit_lens(lm, sae, latents)
    best = lens.topk(min(n, lens.shape[1]), dim=1).indices.tolist()
    return [tuple(lm.tokenizer.decode([t]) for t in tokens) for tokens in best]


def format_layer_table(rows: list[LayerRow], top: int, layers: list[int]) -> str:
    """The ranking across layers as one markdown table, and how many of its rows each layer holds."""
    lens = any(r.lens for r in rows)
    out = [
        "## Top latents across layers by GradSAE",
        "",
        "| rank | latent | mean act | GradSAE influence | rank in its layer |"
        + (" logit lens (raises) |" if lens else ""),
        "|---:|---|---:|---:|---:|" + ("---|" if lens else ""),
    ]
    for i, r in enumerate(rows, 1):
        line = f"| {i} | {r.id} | {r.activation:.4g} | {r.influence:.4g} | {r.rank_in_layer} |"
        out.append(line + (f" {' '.join(repr(w) for w in r.lens)} |" if lens else ""))
    counts = ", ".join(f"L{layer} {sum(r.layer == layer for r in rows)}" for layer in layers)
    out += ["", f"Layers of the top-{top}: {counts}."]
    return "\n".join(out) + "\n"


def _layers_header(
    lm: LoadedModel,
    found: list[ResolvedSAE],
    args: argparse.Namespace,
    text: str,
    by_layer: dict[int, Scores],
    seconds: float,
) -> str:
    first = by_layer[found[0].layer]
    n_tokens = int(first.token_index[:, 1].max()) + 1 if len(first.token_index) else 0
    active = ", ".join(f"L{layer} {int(s.active_last[0])}" for layer, s in by_layer.items())
    return "\n".join(
        [
            f"# gradsae score: {lm.name}, layers {', '.join(str(f.layer) for f in found)} (one forward, one backward)",
            "- SAEs: " + "; ".join(f"L{f.layer}: {f.label}" for f in found),
            f"- objective: {objective_words(lm, args, first)} (Y = {float(first.objective[0]):.4g}); "
            f"splice mode: error at every layer; aggregation: {args.aggregation}",
            "- estimator: gradsae, ranked across layers (latents named L<layer>/<index>)",
            f"- prompt: {args.prompt!r} ({n_tokens} tokens{' with chat template' if text != args.prompt else ''})",
            f"- latents active at the last token: {active}; wall time {seconds:.1f} s",
        ]
    )
