""" "Will these soup?": diagnostics before a merge, streamed tensor by tensor.

Averaging weights works when the models sit in one basin of the loss landscape: fine-tunes of
one pretrained initialisation usually do (Neyshabur et al. 2020, Frankle et al. 2020; the
model-soups paper relies on it), independently initialised networks usually do not. `diagnose`
gathers the evidence, reading every input once, chunk by chunk (never a whole model):

- **architecture and vocabulary**: the same tensor names and shapes in every model (a
  ``--strip-prefix`` is suggested when the names differ only by a wrapper prefix), the same
  embedding rows, and the same tokenizer files and ``config.json`` model type;
- **distances**: the cosine similarity of the models' raw weights and their relative distance
  ``||a - b|| / mean(||a||, ||b||)``: fine-tunes of one initialisation are close (cosine near 1),
  independent initialisations are nearly orthogonal (cosine near 0, distance near sqrt(2));
- with ``base``: each model's **task vector** ``tau_i = theta_i - theta_base``: its norm, its
  distance from the base relative to ``||theta_base||``, the **cosine-similarity matrix** of
  the task vectors (accumulated as float64 dot products, chunk by chunk), and the
  **sign-conflict rate** per layer: of the entries where at least two task vectors are
  non-zero, the fraction where their signs disagree (what TIES's sign election resolves);
- with an ``evaluator`` (``callable(state_dict) -> float``, higher is better): **linear mode
  connectivity**: the score along the straight line ``(1 - alpha) a + alpha b`` (the linear
  soup of the two, computed by soupkit's engine) at ``points`` values of alpha, and the
  **barrier** ``max_alpha [(1 - alpha) s(a) + alpha s(b) - s(alpha)]``, how far the path dips
  below the line between the endpoint scores (0 when there is no dip).

The verdict is plain and cites the evidence, e.g. "share an initialisation, low barrier: safe
to soup" or "different initialisations: averaging will fail". Thresholds (``cosine_threshold``,
``barrier_tolerance``) are parameters; they are heuristics, documented in docs/ecosystem.md.
Plots (a PNG heatmap of the cosine matrix, the interpolation curves, sign conflicts per layer)
are drawn with matplotlib's Agg canvas when an output folder is given.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit._util import extras as _extras
from soupkit._util.progress import progress_bar
from soupkit.api.merging import merge_state_dicts
from soupkit.errors import UsageError
from soupkit.evaluate import load_evaluator, run_evaluator
from soupkit.io.checkpoint import Checkpoint, in_memory_checkpoint, open_checkpoint
from soupkit.io.digest import sha256_file
from soupkit.io.names import KeyMap, as_state_dict, prefix_hint, rename_checkpoint
from soupkit.io.reader import TensorReader

__all__ = ["DiagnosisReport", "Interpolation", "diagnose"]

CHUNK = 1 << 20
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_PRE = ("embed", "wte", "wpe", "tok_", "word_embeddings", "position_embeddings", "token_type")
_VOCAB = (
    "embed_tokens",
    "word_embeddings",
    "wte",
    "lm_head",
    "embed_out",
    "shared",
    "tok_embeddings",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

ModelLike = str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass(frozen=True)
class Interpolation:
    """Scores along the straight line between models ``a`` and ``b``.

    Attributes:
        a: index of the first model (alpha = 0).
        b: index of the second model (alpha = 1).
        alphas: the interpolation weights.
        scores: the evaluator's score of ``(1 - alpha) a + alpha b`` for each alpha.
        barrier: ``max_alpha [(1 - alpha) s_0 + alpha s_1 - s(alpha)]`` (>= 0).
        barrier_alpha: where the largest dip is.
    """

    a: int
    b: int
    alphas: tuple[float, ...]
    scores: tuple[float, ...]
    barrier: float
    barrier_alpha: float


@dataclass
class DiagnosisReport:
    """Everything `diagnose` found, and its verdict.

    Attributes:
        models: the models' labels, in order.
        base: the base model's label (None without a base).
        verdict: one line, e.g. ``"share an initialisation, low barrier: safe to soup"``.
        safe: whether the evidence says a soup should work.
        evidence: the facts behind the verdict, one per line.
        advice: suggestions that do not change the verdict (e.g. try TIES for sign conflicts).
        same_architecture: every model has the same tensor names and shapes.
        architecture_problems: what differs.
        same_vocabulary: same embedding rows and tokenizer files (None: cannot tell).
        vocab_sizes: label -> embedding rows.
        num_params: parameters compared (float tensors common to all models).
        weight_cosine: cosine similarity of the models' raw weights (n x n).
        weight_distance: ``||a - b|| / mean(||a||, ||b||)`` between models (n x n).
        task_vector_norms: label -> ``||theta_i - theta_base||`` (with a base).
        distance_from_base: label -> ``||theta_i - theta_base|| / ||theta_base||`` (with a base).
        cosine: cosine similarity of the task vectors (n x n, with a base).
        sign_conflicts: layer group -> sign-conflict rate (with a base).
        sign_conflict_rate: over all compared entries (with a base).
        interpolations: linear mode connectivity curves (with an evaluator).
        plots: name -> PNG path (when an output folder was given).
    """

    models: list[str]
    base: str | None
    verdict: str = ""
    safe: bool = False
    evidence: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    same_architecture: bool = True
    architecture_problems: list[str] = field(default_factory=list)
    same_vocabulary: bool | None = None
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    num_params: int = 0
    weight_cosine: list[list[float]] = field(default_factory=list)
    weight_distance: list[list[float]] = field(default_factory=list)
    task_vector_norms: dict[str, float] = field(default_factory=dict)
    distance_from_base: dict[str, float] = field(default_factory=dict)
    cosine: list[list[float]] | None = None
    sign_conflicts: dict[str, float] = field(default_factory=dict)
    sign_conflict_rate: float | None = None
    interpolations: list[Interpolation] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        out: dict[str, Any] = _clean(asdict(self))
        return out

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def summary(self) -> str:
        """A human-readable summary: verdict, evidence, matrices."""
        short = _short(self.models)
        lines = [f"verdict: {self.verdict}", ""]
        lines += [f"  - {e}" for e in self.evidence]
        if self.advice:
            lines += ["", "advice:"] + [f"  - {a}" for a in self.advice]
        if self.weight_cosine:
            lines += ["", "weight cosine similarity:"] + _matrix(self.weight_cosine, short)
        if self.cosine is not None:
            lines += ["", f"task-vector cosine similarity (base {self.base}):"] + _matrix(
                self.cosine, short
            )
            lines += ["", "task vectors:"]
            lines += [
                f"  {s:<24} norm {self.task_vector_norms[m]:.4g}   {100 * self.distance_from_base[m]:.3g}% of the base's norm"
                for m, s in zip(self.models, short)
            ]
        if self.sign_conflicts:
            lines += ["", f"sign conflicts (overall {100 * (self.sign_conflict_rate or 0):.1f}%):"]
            lines += [f"  {g:<14} {100 * r:5.1f}%" for g, r in self.sign_conflicts.items()]
        for it in self.interpolations:
            pts = "  ".join(f"{a:.1f}:{s:.4g}" for a, s in zip(it.alphas, it.scores))
            lines += [
                "",
                f"interpolation {short[it.a]} -> {short[it.b]}: barrier {it.barrier:.4g} at alpha {it.barrier_alpha:.2f}",
                f"  {pts}",
            ]
        if self.plots:
            lines += [""] + [f"plot: {p}" for p in self.plots.values()]
        return "\n".join(lines)


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _short(labels: Sequence[str]) -> list[str]:
    names = [Path(str(x).rstrip("/")).name or str(x) for x in labels]
    return names if len(set(names)) == len(names) else [str(x) for x in labels]


def _matrix(m: Sequence[Sequence[float]], labels: Sequence[str]) -> list[str]:
    w = max(8, max(len(s[:16]) for s in labels) + 1)
    head = " " * 18 + "".join(f"{s[:16]:>{w}}" for s in labels)
    return [head] + [
        f"  {labels[i][:16]:<16}" + "".join(f"{v:>{w}.4f}" for v in row) for i, row in enumerate(m)
    ]


def _group(name: str) -> str:
    """``layer N`` for numbered layers, ``embeddings``, else the tensor's module (``lm_head``)."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if any(k in name.lower() for k in _PRE):
        return "embeddings"
    return name.rsplit(".", 1)[0] if "." in name else name


def _open(x: ModelLike, label: str, allow_pickle: bool) -> Checkpoint:
    if isinstance(x, (str, os.PathLike)):
        return open_checkpoint(x, allow_pickle=allow_pickle)
    return in_memory_checkpoint(as_state_dict(x, label), label)


def _file_digest(path: Path) -> str | None:
    try:
        if path.stat().st_size > 200_000_000:
            return None
        return sha256_file(path)
    except OSError:
        return None


def _config(ck: Checkpoint) -> dict[str, Any]:
    if ck.folder is None or not (ck.folder / "config.json").is_file():
        return {}
    try:
        obj = json.loads((ck.folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _check_structure(cks: Sequence[Checkpoint], rep: DiagnosisReport) -> list[str]:
    """Fill architecture/vocabulary facts; return the float tensor names common to all."""
    ref = cks[0]
    for ck in cks[1:]:
        missing = [n for n in ref.tensors if n not in ck.tensors]
        extra = [n for n in ck.tensors if n not in ref.tensors]
        shapes = [
            n
            for n in ref.tensors
            if n in ck.tensors and ck.tensors[n].shape != ref.tensors[n].shape
        ]
        if missing or extra:
            hint = prefix_hint(ref.tensors, ck.tensors) or prefix_hint(ck.tensors, ref.tensors)
            rep.architecture_problems.append(
                f"{ck.label}: {len(missing)} tensor(s) of {ref.label} missing"
                f"{' (e.g. ' + repr(missing[0]) + ')' if missing else ''}, {len(extra)} extra"
                f"{' (e.g. ' + repr(extra[0]) + ')' if extra else ''}"
                + (f"; the names differ by a prefix: try {hint}" if hint else "")
            )
        for n in shapes[:5]:
            rep.architecture_problems.append(
                f"{ck.label}: {n!r} is {list(ck.tensors[n].shape)}, "
                f"{ref.label} has {list(ref.tensors[n].shape)}"
            )
        if len(shapes) > 5:
            rep.architecture_problems.append(
                f"{ck.label}: {len(shapes) - 5} more tensors differ in shape"
            )
    configs = [_config(c) for c in cks]
    types = {str(c.get("model_type")) for c in configs if c.get("model_type")}
    if len(types) > 1:
        rep.architecture_problems.append(
            f"config.json model_type differs: {', '.join(sorted(types))}"
        )
    rep.same_architecture = not rep.architecture_problems
    # vocabulary: embedding rows, and the tokenizer files where present
    vocab_problems = []
    for ck in cks:
        emb = next(
            (t for n, t in ck.tensors.items() if any(v in n for v in _VOCAB) and len(t.shape) == 2),
            None,
        )
        if emb is not None:
            rep.vocab_sizes[ck.label] = int(emb.shape[0])
    if len(set(rep.vocab_sizes.values())) > 1:
        vocab_problems.append(
            "embedding rows differ: " + ", ".join(f"{k}: {v}" for k, v in rep.vocab_sizes.items())
        )
    for fname in _TOKENIZER_FILES:
        digests = {
            c.label: _file_digest(c.folder / fname)
            for c in cks
            if c.folder is not None and (c.folder / fname).is_file()
        }
        if len(digests) == len(cks) and len(set(digests.values())) > 1:
            vocab_problems.append(f"{fname} differs between the models")
    if vocab_problems:
        rep.same_vocabulary = False
        rep.architecture_problems += [
            p for p in vocab_problems if p not in rep.architecture_problems
        ]
    elif rep.vocab_sizes:
        rep.same_vocabulary = True
    common = [
        n
        for n, t in ref.tensors.items()
        if t.is_float
        and all(
            n in c.tensors and c.tensors[n].shape == t.shape and c.tensors[n].is_float
            for c in cks[1:]
        )
    ]
    return common


def _stream_stats(
    cks: Sequence[Checkpoint],
    base: Checkpoint | None,
    names: Sequence[str],
    rep: DiagnosisReport,
    progress: bool | None,
) -> None:
    """One pass over the common tensors: float64 dot products, norms, sign conflicts."""
    n = len(cks)
    wdot = torch.zeros(n, n, dtype=torch.float64)
    wdist = torch.zeros(n, n, dtype=torch.float64)
    tdot = torch.zeros(n, n, dtype=torch.float64)
    base_sq = 0.0
    conflicts: dict[str, list[int]] = {}
    total = sum(
        sum(c.tensors[nm].nbytes for c in cks)
        + (base.tensors[nm].nbytes if base is not None else 0)
        for nm in names
    )
    bar = progress_bar(total, progress, "diagnose", unit="B")
    try:
        with TensorReader() as reader, torch.inference_mode():
            for nm in names:
                infos = [c.tensors[nm] for c in cks]
                binfo = base.tensors[nm] if base is not None else None
                grp = _group(nm)
                for a in range(0, max(infos[0].numel, 1), CHUNK):
                    b = min(infos[0].numel, a + CHUNK)
                    if b <= a:
                        break
                    x = torch.stack([reader.read(i, a, b).to(torch.float64) for i in infos])
                    wdot += x @ x.T
                    for i in range(n):
                        d = x[i + 1 :] - x[i]
                        wdist[i, i + 1 :] += (d * d).sum(1)
                    if binfo is not None:
                        bx = reader.read(binfo, a, b).to(torch.float64)
                        base_sq += float(bx @ bx)
                        tau = x - bx
                        tdot += tau @ tau.T
                        if n >= 2:
                            pos = (tau > 0).sum(0)
                            neg = (tau < 0).sum(0)
                            nz = pos + neg
                            both = nz >= 2
                            c = conflicts.setdefault(grp, [0, 0])
                            c[0] += int(((pos > 0) & (neg > 0) & both).sum())
                            c[1] += int(both.sum())
                    bar.update(
                        sum((b - a) * i.itemsize for i in infos)
                        + ((b - a) * binfo.itemsize if binfo else 0)
                    )
                rep.num_params += infos[0].numel
    finally:
        bar.close()
    wdist = wdist + wdist.T
    norms = wdot.diagonal().sqrt()
    rep.weight_cosine = [[_cos(wdot[i, j], norms[i], norms[j]) for j in range(n)] for i in range(n)]
    rep.weight_distance = [
        [
            0.0
            if i == j
            else float(wdist[i, j].sqrt() / ((norms[i] + norms[j]) / 2))
            if (norms[i] + norms[j]) > 0
            else 0.0
            for j in range(n)
        ]
        for i in range(n)
    ]
    if base is not None:
        tn = tdot.diagonal().sqrt()
        bn = math.sqrt(base_sq)
        rep.task_vector_norms = {c.label: float(tn[i]) for i, c in enumerate(cks)}
        rep.distance_from_base = {
            c.label: float(tn[i] / bn) if bn > 0 else float("inf") for i, c in enumerate(cks)
        }
        rep.cosine = [[_cos(tdot[i, j], tn[i], tn[j]) for j in range(n)] for i in range(n)]
        if conflicts:

            def order(g: str) -> tuple[int, int, str]:
                if g == "embeddings":
                    return (0, 0, "")
                if re.fullmatch(r"layer \d+", g):
                    return (1, int(g.split()[1]), "")
                return (2, 0, g)

            # groups where fewer than two task vectors touch any entry have no rate to report
            rep.sign_conflicts = {
                g: c[0] / c[1]
                for g, c in sorted(conflicts.items(), key=lambda kv: order(kv[0]))
                if c[1]
            }
            tot = sum(c[1] for c in conflicts.values())
            rep.sign_conflict_rate = sum(c[0] for c in conflicts.values()) / tot if tot else 0.0


def _cos(dot: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> float:
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(max(-1.0, min(1.0, float(dot / (na * nb)))))


def _load_state(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The whole model in memory (an evaluator needs it); in-memory inputs are copied, never shared."""
    with TensorReader() as reader:
        return {
            n: (reader.read(t) if t.data is None else reader.read(t).clone()).reshape(t.shape)
            for n, t in ck.tensors.items()
        }


def _interpolate(
    cks: Sequence[Checkpoint],
    pairs: Sequence[tuple[int, int]],
    evaluator: Callable[..., Any],
    points: int,
    progress: bool | None,
) -> list[Interpolation]:

    alphas = tuple(i / (points - 1) for i in range(points))
    out = []
    bar = progress_bar(len(pairs) * points, progress, "interpolate", unit="eval")
    try:
        for i, j in pairs:
            a, b = _load_state(cks[i]), _load_state(cks[j])
            scores = []
            for al in alphas:
                if al == 0.0:
                    state = a
                elif al == 1.0:
                    state = b
                else:
                    state = merge_state_dicts(
                        [a, b], "linear", model_parameters=[{"weight": 1.0 - al}, {"weight": al}]
                    )
                label = f"{cks[i].label} -> {cks[j].label} at alpha {al:.2f}"
                scores.append(run_evaluator(evaluator, state, label=label).score)
                bar.update(1)
            dips = [(1 - al) * scores[0] + al * scores[-1] - s for al, s in zip(alphas, scores)]
            k = max(range(len(dips)), key=lambda t: dips[t])
            out.append(Interpolation(i, j, alphas, tuple(scores), max(0.0, dips[k]), alphas[k]))
    finally:
        bar.close()
    return out


def _verdict(rep: DiagnosisReport, cosine_threshold: float, barrier_tolerance: float) -> None:
    ev, adv = rep.evidence, rep.advice
    n = len(rep.models)
    if not rep.same_architecture:
        vocab = rep.same_vocabulary is False
        rep.verdict = (
            "different vocabularies: averaging cannot work until the embeddings match"
            if vocab
            and not any("missing" in p or "model_type" in p for p in rep.architecture_problems)
            else "different architectures: these models cannot be souped"
        )
        rep.safe = False
        ev += rep.architecture_problems
        return
    ev.append(
        f"same architecture: {n} models, {rep.num_params:,} parameters compared"
        + (f", vocabulary {next(iter(rep.vocab_sizes.values()))}" if rep.vocab_sizes else "")
    )
    off = [(i, j) for i in range(n) for j in range(i + 1, n)]
    min_cos = min((rep.weight_cosine[i][j] for i, j in off), default=1.0)
    max_dist = max((rep.weight_distance[i][j] for i, j in off), default=0.0)
    shared = min_cos >= cosine_threshold
    if off:
        ev.append(
            f"weight cosine similarity between models: min {min_cos:.4f} "
            f"({'>=' if shared else '<'} {cosine_threshold}); largest relative distance {max_dist:.3g}"
            + (
                ""
                if shared
                else " (independent initialisations give cosine near 0, distance near 1.41)"
            )
        )
    far: list[str] = []
    if rep.base is not None:
        far = [m for m, d in rep.distance_from_base.items() if d > 1 - cosine_threshold]
        dists = ", ".join(
            f"{Path(m).name or m} {100 * d:.3g}%" for m, d in rep.distance_from_base.items()
        )
        ev.append(f"distance from the base, relative to its norm: {dists}")
        if far:
            ev.append(
                f"{', '.join(far)} {'is' if len(far) == 1 else 'are'} far from the base: not a "
                "fine-tune of it"
            )
        if rep.cosine is not None and off:
            tv = [rep.cosine[i][j] for i, j in off]
            ev.append(f"task-vector cosine similarity: {min(tv):.3f} .. {max(tv):.3f}")
            if max(tv) > 0.95:
                adv.append(
                    "some task vectors are nearly parallel: those fine-tunes learned much the same update"
                )
        if rep.sign_conflict_rate is not None and n >= 2:
            ev.append(
                f"sign conflicts: {100 * rep.sign_conflict_rate:.1f}% of the entries two or more "
                "task vectors change"
            )
            if rep.sign_conflict_rate > 0.3:
                adv.append(
                    "many sign conflicts: TIES (merge_method: ties) elects one sign per entry "
                    "instead of letting opposite updates cancel"
                )
    barrier_bad: list[Interpolation] = []
    for it in rep.interpolations:
        scale = max(abs(it.scores[0]), abs(it.scores[-1]), 1e-12)
        bad = it.barrier > barrier_tolerance * scale
        if bad:
            barrier_bad.append(it)
        ev.append(
            f"interpolation {Path(rep.models[it.a]).name} -> {Path(rep.models[it.b]).name}: "
            f"endpoint scores {it.scores[0]:.4g} / {it.scores[-1]:.4g}, midpoint {it.scores[len(it.scores) // 2]:.4g}, "
            f"barrier {it.barrier:.4g} ({'>' if bad else '<='} {barrier_tolerance:g} x endpoint score)"
        )
    if not shared or (rep.base is not None and len(far) == n):
        rep.verdict = (
            "different bases: averaging will fail"
            if rep.base is None or not shared
            else "the models are not fine-tunes of this base: task-vector merges will fail"
        )
        if barrier_bad:
            rep.verdict += " (and the interpolation shows a high barrier)"
        rep.safe = False
    elif barrier_bad:
        rep.verdict = "share an initialisation, but high barrier: not linearly mode-connected, a soup will lose accuracy"
        rep.safe = False
    elif far:
        rep.verdict = (
            "share an initialisation, but some models are far from the base: check the base"
        )
        rep.safe = False
    elif rep.interpolations:
        rep.verdict = "share an initialisation, low barrier: safe to soup"
        rep.safe = True
    else:
        rep.verdict = (
            "share an initialisation: likely safe to soup "
            "(give an evaluator to check the interpolation barrier)"
        )
        rep.safe = True


def _plots(rep: DiagnosisReport, folder: Path) -> None:
    FigureCanvasAgg = _extras.require(
        "matplotlib.backends.backend_agg", "plot", "plotting"
    ).FigureCanvasAgg
    Figure = _extras.require("matplotlib.figure", "plot", "plotting").Figure

    folder.mkdir(parents=True, exist_ok=True)
    short = _short(rep.models)

    def save(fig: Any, name: str) -> None:
        FigureCanvasAgg(fig)
        path = folder / name
        fig.savefig(path, format="png")
        rep.plots[name.removesuffix(".png")] = str(path)

    mat = rep.cosine if rep.cosine is not None else rep.weight_cosine
    if mat:
        n = len(mat)
        fig = Figure(figsize=(1.2 + 0.9 * n, 0.9 + 0.8 * n), dpi=110, layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), [s[:14] for s in short], rotation=45, ha="right")
        ax.set_yticks(range(n), [s[:14] for s in short])
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{mat[i][j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if abs(mat[i][j]) > 0.6 else "black",
                    fontsize=8,
                )
        ax.set_title("task-vector cosine" if rep.cosine is not None else "weight cosine")
        fig.colorbar(im, ax=ax, shrink=0.8)
        save(fig, "cosine.png")
    if rep.interpolations:
        fig = Figure(figsize=(6, 4), dpi=110, layout="constrained")
        ax = fig.add_subplot()
        for it in rep.interpolations:
            label = f"{short[it.a]} -> {short[it.b]} (barrier {it.barrier:.3g})"
            (line,) = ax.plot(it.alphas, it.scores, marker="o", label=label)
            ax.plot(
                [0, 1],
                [it.scores[0], it.scores[-1]],
                linestyle="--",
                color=line.get_color(),
                alpha=0.6,
            )
        ax.set_xlabel("alpha: (1 - alpha) * A + alpha * B")
        ax.set_ylabel("score (higher is better)")
        ax.set_title("linear mode connectivity")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "interpolation.png")
    if rep.sign_conflicts:
        groups = list(rep.sign_conflicts)
        fig = Figure(
            figsize=(max(4.0, 0.35 * len(groups) + 1.5), 3.5), dpi=110, layout="constrained"
        )
        ax = fig.add_subplot()
        ax.bar(range(len(groups)), [100 * rep.sign_conflicts[g] for g in groups], color="#ef6c00")
        ticks = [g.replace("layer ", "") for g in groups]
        if len(groups) > 12 or any(len(t) > 3 for t in ticks):  # long names would overlap
            ax.set_xticks(
                range(len(groups)),
                ticks,
                rotation=90 if len(groups) > 24 else 45,
                ha="center" if len(groups) > 24 else "right",
            )
        else:
            ax.set_xticks(range(len(groups)), ticks)
        ax.set_ylabel("sign conflicts (%)")
        ax.set_xlabel("layer / module")
        ax.set_title("sign conflicts between task vectors")
        save(fig, "sign_conflicts.png")


def diagnose(
    models: Sequence[ModelLike],
    base: ModelLike | None = None,
    *,
    evaluator: Callable[..., Any] | str | None = None,
    points: int = 11,
    pairs: Sequence[tuple[int, int]] | None = None,
    out: str | os.PathLike[str] | None = None,
    cosine_threshold: float = 0.5,
    barrier_tolerance: float = 0.05,
    allow_pickle: bool = False,
    key_map: KeyMap | None = None,
    progress: bool | None = None,
) -> DiagnosisReport:
    """Tell whether ``models`` can be souped, with the evidence (see the module docstring).

    Args:
        models: two or more models: paths (files or folders), state dicts or ``nn.Module`` s.
        base: their common pretrained model, for task vectors and sign conflicts.
        evaluator: ``callable(state_dict) -> float`` (higher is better) or an import string
            ``"package.module:function"``; enables the interpolation curves and barriers.
        points: points on each interpolation path (alpha = 0, 1/(points-1), ..., 1).
        pairs: which models to interpolate between (indices); default: the first model with
            each of the others.
        out: a folder for ``diagnosis.json`` and the PNG plots.
        cosine_threshold: weight cosine below which two models are taken to come from
            different initialisations (and distance from the base above ``1 - threshold``).
        barrier_tolerance: a barrier above this fraction of the larger endpoint score counts
            as high.
        allow_pickle: accept pickle checkpoints (``torch.load(weights_only=True)``).
        key_map: rename tensors first (e.g. strip a ``module.`` prefix).
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        A `DiagnosisReport`.

    Raises:
        UsageError: fewer than two models, or bad ``points`` / ``pairs``.
        CheckpointFormatError: an unreadable input.
        EvaluationError: the evaluator failed on an interpolated candidate.
    """
    if len(models) < 2 and base is None:
        raise UsageError("diagnose needs at least two models (or one model and --base)")
    if points < 3:
        raise UsageError(f"points must be at least 3 to see a barrier, got {points}")
    labels = [
        str(m) if isinstance(m, (str, os.PathLike)) else f"model {i}" for i, m in enumerate(models)
    ]
    cks = [
        rename_checkpoint(_open(m, lab, allow_pickle), key_map) for m, lab in zip(models, labels)
    ]
    base_ck = (
        rename_checkpoint(_open(base, "base", allow_pickle), key_map) if base is not None else None
    )
    rep = DiagnosisReport(
        models=[c.label for c in cks], base=base_ck.label if base_ck is not None else None
    )
    names = _check_structure(cks + ([base_ck] if base_ck is not None else []), rep)
    if names:
        _stream_stats(cks, base_ck, names, rep, progress)
    if evaluator is not None and rep.same_architecture:
        if isinstance(evaluator, str):
            evaluator = load_evaluator(evaluator)
        if pairs is None:
            pairs = [(0, j) for j in range(1, len(cks))]
        for i, j in pairs:
            if not (0 <= i < len(cks) and 0 <= j < len(cks)) or i == j:
                raise UsageError(
                    f"pair ({i}, {j}): expected two different model indices below {len(cks)}"
                )
        rep.interpolations = _interpolate(cks, pairs, evaluator, points, progress)
    _verdict(rep, cosine_threshold, barrier_tolerance)
    if out is not None:
        folder = Path(out)
        if _extras.available("matplotlib"):
            _plots(rep, folder)
        else:
            rep.advice.append("install matplotlib (pip install 'soupkit[plot]') for the plots")
        folder.mkdir(parents=True, exist_ok=True)
        rep.to_json(folder / "diagnosis.json")
    return rep
