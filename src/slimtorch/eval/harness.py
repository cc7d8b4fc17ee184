"""Evaluate a zoo model (or a compressed copy of one) on its task. Plain dataclasses out.

``evaluate(name)`` measures the FP model; ``evaluate(name, model=q, reference=fp)`` measures a
compressed model ``q`` and how closely it follows ``fp`` (agreement, cosine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.eval import metrics as M
from slimtorch.eval.user_data import text_tokens, user_images
from slimtorch.progress import Progress, no_progress
from slimtorch.zoo import data, get_entry, load_model


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str = ""
    higher_is_better: bool = True


@dataclass
class EvalResult:
    model: str
    task: str
    dataset: str
    metrics: list[Metric]
    params: int
    size_bytes: int
    latency_ms: float | None  # median CPU latency on ``example``; None when not measured
    latency_input: str
    seconds: float
    details: dict = field(default_factory=dict)
    example: tuple = field(default=(), repr=False)  # the forward arguments latency is measured on
    # what a later evaluation of a compressed copy compares against (the FP predictions), so that the FP
    # model does not run twice: see ``evaluate(..., reference=...)``
    outputs: dict = field(default_factory=dict, repr=False)

    def metric(self, name: str) -> float:
        for m in self.metrics:
            if m.name == name:
                return m.value
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("example", "outputs")}


@dataclass
class _TaskOut:
    dataset: str
    metrics: list[Metric]
    example: torch.Tensor | tuple
    details: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


class Reference:
    """What a task compares a compressed model against: the FP model, and the FP predictions its own
    evaluation recorded (then the FP model is not run again)."""

    def __init__(self, model: nn.Module | None, recorded: dict | None = None) -> None:
        self.model, self.recorded = model, recorded or {}

    def get(self, key: str, compute: Callable[[], object], size: int):
        """The recorded ``key`` if it holds ``size`` items (it was recorded on the same data), else
        ``compute()`` with the reference model."""
        got = self.recorded.get(key)
        n = None if got is None else len(got[0]) if isinstance(got, tuple) else len(got)
        return got if n == size else compute()


# ----------------------------------------------------------------------------- tasks
def _classify(model: nn.Module, ref: Reference | None, x: torch.Tensor, y: torch.Tensor, batch: int,
              progress: Progress, top5: bool = False) -> tuple[list[Metric], torch.Tensor]:
    """Top-1 (and top-5) accuracy of ``model`` on ``x`` against ``y``, in batches, and its top-1 agreement with
    ``ref``'s logits (recorded, or computed); returns the metrics and the logits."""
    logits = torch.cat([model(x[i:i + batch]) for i in progress(range(0, len(x), batch), "classifying")])
    out = [Metric("top1_accuracy", M.top1_accuracy(logits, y), "%")]
    if top5:
        hits = (logits.topk(5, -1).indices == y[:, None]).any(-1)
        out.append(Metric("top5_accuracy", 100.0 * hits.float().mean().item(), "%"))
    if ref is not None:
        ref_logits = ref.get("logits", lambda: torch.cat([ref.model(x[i:i + batch]) for i in range(0, len(x), batch)]),
                             len(x))
        out.append(Metric("top1_agreement", M.top1_agreement(logits, ref_logits), "%"))
    return out, logits


@torch.no_grad()
def _fmnist(model: nn.Module, ref: Reference | None, limit: int | None, progress: Progress,
            user_data: Path | None = None) -> _TaskOut:
    if user_data is not None:
        u = user_images(user_data, "fmnist-classification", need_labels=True)
        x, y, source = u.x, u.y, u.source
    else:
        test = data.fashion_mnist("test")
        x, y, source = test.normalized(), test.labels, "Fashion-MNIST test"
    if limit:
        x, y = x[:limit], y[:limit]
    out, logits = _classify(model, ref, x, y, 500, progress)
    return _TaskOut(f"{source} ({len(x)} images)" if user_data is None else source + (f", first {len(x)}" if limit else ""),
                    out, (x[:1],), outputs={"logits": logits})


@torch.no_grad()
def _causal_lm(model: nn.Module, ref: Reference | None, limit: int | None, progress: Progress,
               tokens: Callable[[str], torch.Tensor], spread: bool = False, user_data: Path | None = None,
               encode: Callable | None = None) -> _TaskOut:
    """Held-out perplexity: on the first ``limit`` windows, or with ``spread`` on ``limit`` windows evenly
    spaced over the split; with ``user_data``, on the windows of that text file instead."""
    from slimtorch.zoo.lm_data import lm_dims, logits_of

    seq, vocab = lm_dims(model)
    if user_data is not None:
        stream = text_tokens(user_data, encode)
        if len(stream) <= seq:
            raise SlimError(f"evaluation text {user_data} has {len(stream)} tokens; it needs more than {seq} "
                            f"(one window)")
    else:
        stream = tokens("heldout")
    wins = M.windows(stream, seq)
    total = len(wins)
    spread = spread and limit is not None and limit < total
    wins = wins[torch.linspace(0, total - 1, limit).round().long()] if spread else wins[:limit]
    nll, n, agree, preds = 0.0, 0, 0.0, []
    ref_preds = None if ref is None else ref.recorded.get("predictions")
    if ref_preds is not None and ref_preds.shape != wins.shape:
        ref_preds = None  # recorded on other windows: run the reference model
    for i in progress(range(0, len(wins), 4), "perplexity"):
        batch = wins[i:i + 4]
        logits = logits_of(model(batch))
        s, c = M.window_nll(logits, batch)
        nll, n = nll + s, n + c
        preds.append(logits.argmax(-1))
        if ref is not None:
            want = ref_preds[i:i + 4] if ref_preds is not None else logits_of(ref.model(batch)).argmax(-1)
            agree += (preds[-1] == want).sum().item()
    ppl = torch.tensor(nll / n).exp().item()
    unigram = ref.recorded["unigram"] if ref is not None and ref_preds is not None else \
        M.unigram_perplexity(tokens("train"), wins, vocab)
    out = [Metric("heldout_perplexity", ppl, "", False), Metric("unigram_perplexity", unigram, "", False)]
    if ref is not None:
        out.append(Metric("next_token_agreement", 100.0 * agree / wins.numel(), "%"))
    part = (f"{len(wins)} of {total} windows of {seq}, evenly spaced" if spread else
            f"the first {len(wins)} of {total} windows of {seq}" if len(wins) < total else f"{len(wins)} windows of {seq}")
    source = f"{user_data}" if user_data is not None else "python3.11-doc held-out split"
    return _TaskOut(f"{source} ({n} predicted tokens, {part})",
                    out, (wins[:1, :128],), {"predicted_tokens": n, "windows": len(wins), "windows_total": total},
                    {"predictions": torch.cat(preds) if preds else torch.empty(0, seq), "unigram": unigram})


def definition_retrieval_set(n: int = 1000) -> tuple[list[str], list[str]]:
    """``n`` WordNet noun synsets whose first lemma is unambiguous, evenly spaced: (lemmas, definitions)."""
    glosses = data.wordnet_glosses("noun")
    counts: dict[str, int] = {}
    for g in glosses:
        counts[g.lemma] = counts.get(g.lemma, 0) + 1
    unique = [g for g in glosses if counts[g.lemma] == 1]
    picked = unique[:: max(1, len(unique) // n)][:n]
    return [g.lemma for g in picked], [g.definition for g in picked]


@torch.no_grad()
def _embedding(model: nn.Module, ref: Reference | None, limit: int | None, progress: Progress,
               independent: bool = False, user_data: Path | None = None) -> _TaskOut:
    """Definition retrieval; against ``ref`` its cosine and retrieval agreement; with ``independent`` and no
    ``ref``, cosine to sentence-transformers' own pipeline of the same model (minilm)."""
    if user_data is not None:
        raise SlimError("--eval DATA applies to language models (a text file) and vision models (.npz or an image "
                        "folder); sentence encoders are measured on WordNet retrieval")
    lemmas, defs = definition_retrieval_set(limit or 1000)

    def embed(m: nn.Module, texts: list[str]) -> torch.Tensor:
        batches = range(0, len(texts), 64)
        return torch.cat([m.encode(texts[i:i + 64]) for i in progress(batches, "embedding")])

    q, k = embed(model, lemmas), embed(model, defs)
    recall = 100.0 * (M.nearest(q, k) == torch.arange(len(q))).float().mean().item()
    out = [Metric("definition_recall@1", recall, "%")]
    if ref is not None:
        rq, rk = ref.get("embeddings", lambda: (embed(ref.model, lemmas), embed(ref.model, defs)), len(lemmas))
        cos = M.cosine_to_reference(torch.cat([q, k]), torch.cat([rq, rk]))
        out += [Metric("mean_cosine_to_reference", cos.mean().item()),
                Metric("min_cosine_to_reference", cos.min().item()),
                Metric("retrieval_agreement", M.retrieval_agreement(q, k, rq, rk), "%")]
    elif independent and (st := _sentence_transformers_reference()) is not None:
        # An independent implementation of the same model: how exactly do we reproduce it?
        texts = lemmas + defs
        ref_emb = torch.cat([torch.from_numpy(st.encode(texts[i:i + 64]))
                             for i in progress(range(0, len(texts), 64), "reference")])
        cos = M.cosine_to_reference(torch.cat([q, k]), ref_emb)
        out.append(Metric("min_cosine_to_sentence_transformers", cos.min().item()))
    enc = model.tokenizer([defs[0]], return_tensors="pt")
    return _TaskOut(f"WordNet 3.0 noun glosses: lemma -> definition retrieval among {len(q)}", out,
                    (enc["input_ids"], enc["attention_mask"]), outputs={"embeddings": (q, k)})


def _sentence_transformers_reference():
    """sentence-transformers' own pipeline for all-MiniLM-L6-v2, or None where it is not installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    from slimtorch.zoo.minilm import package_dir

    return SentenceTransformer(str(package_dir()), device="cpu")


def _photo_batch(names: Iterable[str]) -> torch.Tensor:
    from slimtorch.zoo.efficientnet import preprocess

    return torch.cat([preprocess(data.photo(n)) for n in names])


@torch.no_grad()
def _imagenet(model: nn.Module, ref: Reference | None, limit: int | None, progress: Progress,
              user_data: Path | None = None) -> _TaskOut:
    if user_data is not None:
        return _imagenet_user(model, ref, limit, progress, user_data)
    names = list(data.LABELLED_PHOTOS)
    x = _photo_batch(names)
    logits = model(x)
    allowed = [set(data.LABELLED_PHOTOS[n]) for n in names]
    out = [Metric("photos_top1_hits", M.topk_hits(logits, allowed, 1), f"of {len(names)}"),
           Metric("photos_top5_hits", M.topk_hits(logits, allowed, 5), f"of {len(names)}")]
    classes = data.imagenet_classes()
    top5 = {n: [classes[j] for j in row] for n, row in zip(names, logits.topk(5, -1).indices.tolist())}
    if ref is not None:
        xa = torch.cat([x, _photo_batch(data.UNLABELLED_PHOTOS)])
        xa = torch.cat([xa, xa.flip(-1)])
        out.append(Metric("top1_agreement", M.top1_agreement(model(xa), ref.model(xa)), "%"))
    return _TaskOut(f"scikit-image photos ({', '.join(names)})", out, (x[:1],), {"top5": top5})


def task_batch(name: str, n: int, tokenizer=None) -> tuple[torch.Tensor, ...]:
    """Forward arguments of a batch of ``n`` evaluation inputs of zoo model ``name`` (repeated where the
    evaluation set is smaller): what deployment latency and throughput are measured on. ``tokenizer``:
    a sentence encoder's (the model's own is loaded when None)."""
    entry = get_entry(name)
    if entry.task == "fmnist-classification":
        return (data.fashion_mnist("test").normalized()[:n],)
    if entry.task == "imagenet-classification":
        x = _photo_batch([*data.LABELLED_PHOTOS, *data.UNLABELLED_PHOTOS])
        return (x.repeat(-(-n // len(x)), 1, 1, 1)[:n],)
    if entry.task == "sentence-embedding":
        from slimtorch.zoo.minilm import MAX_TOKENS

        defs = definition_retrieval_set(1000)[1]
        defs = (defs * -(-n // len(defs)))[:n]
        tokenizer = tokenizer or load_model(name).tokenizer
        enc = tokenizer(defs, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    raise SlimError(f"no deployment batch for {name} (task {entry.task})")


@torch.no_grad()
def _imagenet_user(model: nn.Module, ref: Reference | None, limit: int | None, progress: Progress,
                   path: Path) -> _TaskOut:
    u = user_images(path, "imagenet-classification", need_labels=True)
    x, y = (u.x[:limit], u.y[:limit]) if limit else (u.x, u.y)
    out, logits = _classify(model, ref, x, y, 32, progress, top5=True)
    return _TaskOut(u.source + (f", first {len(x)}" if limit else ""), out, (x[:1],), outputs={"logits": logits})


TASKS: dict[str, Callable[..., _TaskOut]] = {
    "fmnist-classification": _fmnist,
    "causal-lm": _causal_lm,
    "sentence-embedding": _embedding,
    "imagenet-classification": _imagenet,
}


def evaluate(name: str, model: nn.Module | None = None, reference: nn.Module | EvalResult | None = None,
             limit: int | None = None, progress: Progress = no_progress, latency: bool = True,
             reference_model: nn.Module | None = None, data: Path | None = None) -> EvalResult:
    """Measure zoo model ``name`` (or ``model``, a compressed copy of it) on its task.

    Args:
        name: zoo model name, or a local transformers folder (a causal LM); picks the task and data.
        model: the model to measure; the zoo's FP model when None.
        reference: a model to compare against (agreement/cosine metrics); none when None. Or the result
            of evaluating that model with the same ``limit``: its recorded predictions are compared against
            without running it again (``reference_model`` is then what runs where a task recorded nothing).
        limit: evaluate on the first ``limit`` items only (images, windows or sentences).
        progress: wraps long loops, e.g. a progress bar; ``(iterable, description) -> iterable``.
        latency: measure the median CPU latency on the task's example (a comparison of two models
            measures both together instead: ``metrics.interleaved_latency``).
        data: the user's own evaluation data (eval.user_data): a text file for a language model, an .npz or
            a folder of class folders for a vision model; the report's dataset line names it.
    """
    entry = get_entry(name)
    if limit is not None and limit <= 0:
        raise SlimError(f"--limit must be a positive number, got {limit}")
    sampled = limit is None and entry.default_limit is not None and data is None
    limit = entry.default_limit if limit is None and data is None else limit
    t0 = time.perf_counter()
    model = load_model(name) if model is None else model
    model.eval()
    run_task = partial(_causal_lm, tokens=entry.tokens, spread=sampled, encode=entry.encode) \
        if entry.task == "causal-lm" else partial(_embedding, independent=name == "minilm") \
        if entry.task == "sentence-embedding" else TASKS[entry.task]
    run_task = partial(run_task, user_data=None if data is None else Path(data))
    if isinstance(reference, EvalResult):
        ref = Reference(reference_model, reference.outputs)
    else:
        ref = None if reference is None else Reference(reference)
    task = run_task(model, ref, limit, progress)
    seconds = time.perf_counter() - t0
    example = task.example
    ms = M.cpu_latency_ms(lambda: model(*example), repeats=10, warmup=2) if latency else None
    dataset = task.dataset + ("; a folder's default sample (--limit N sets the number)" if sampled else "")
    return EvalResult(
        model=name, task=entry.task, dataset=dataset, metrics=task.metrics,
        params=M.param_count(model), size_bytes=M.model_size_bytes(model), latency_ms=ms,
        latency_input=" x ".join(str(tuple(t.shape)) for t in example), seconds=seconds, details=task.details,
        example=tuple(example), outputs=task.outputs,
    )
