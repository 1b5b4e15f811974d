"""``visionpipe tune``'s search: which students, within which budget, and which one wins.

Pure selection and reporting, no training: ``flows/tune.py`` fits, quantizes and
times the candidates this module names, then hands their measurements back
here for the budget verdict, the Pareto front, the winner and the files
(``reports/tune/pareto.csv``, ``pareto.png``, ``tune.json``).

The search space is a documented grid (``search_space``), not a sampler: the same
data and params always give the same candidates in the same order. It holds

- ``efficientnet_lite0_trunk`` (ImageNet-pretrained) with 3 to 8 of Lite0's blocks,
  each at the resolution ``distill.input_size: auto`` resolves to and at about
  two thirds of it (fewer pixels: faster, and for small stored images often as good);
- ``mobilenet`` (depthwise-separable, from scratch) at widths 16, 24 and 32;
- ``cnn`` (plain convolutions, from scratch) at widths 16 and 32;

and every fitted student is quantized both ways, PTQ and QAT, each a row of the front.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.artifacts import atomic_path

TRUNK = "efficientnet_lite0_trunk"
TRUNK_BLOCKS = (3, 4, 5, 6, 7, 8)
SCRATCH_WIDTHS = {"mobilenet": (16, 24, 32), "cnn": (16, 32)}
METHODS = ("ptq", "qat")
# An architecture whose untrained int8 export is this much slower than the latency
# budget is not fitted: training changes its weights, not its graph, so it cannot get
# under the budget, and the margin keeps timing noise from pruning one that could.
PRUNE_LATENCY_MARGIN = 1.2


class BudgetError(ValueError):
    """No candidate can meet the budget; the message names the smallest and fastest."""


@dataclass(frozen=True)
class Candidate:
    """One student architecture: its family, depth or width, and input resolution."""

    model: str
    trunk_blocks: int | None = None
    width: int | None = None
    input_size: int | None = None  # px a pretrained network resizes to; None: the stored size

    @property
    def name(self) -> str:
        if self.model == TRUNK:
            return f"trunk{self.trunk_blocks}-{self.input_size}px"
        return f"{self.model}-w{self.width}"

    def overrides(self) -> dict[str, Any]:
        """The ``distill.*`` params that make the pipeline's student this one."""
        if self.model == TRUNK:
            return {
                "distill.model": TRUNK,
                "distill.pretrained": True,
                "distill.trunk_blocks": self.trunk_blocks,
                "distill.input_size": self.input_size,
            }
        return {
            "distill.model": self.model,
            "distill.pretrained": False,
            "distill.width": self.width,
        }


FAMILIES = ("trunk", *SCRATCH_WIDTHS)  # --families: trunk is efficientnet_lite0_trunk


def search_space(auto_input_size: int, families: Iterable[str] = FAMILIES) -> list[Candidate]:
    """The grid (module docstring), for a dataset whose ``input_size: auto`` is this many px,
    of the ``families`` asked for."""
    families = tuple(families)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown student families {sorted(unknown)}: choose from {FAMILIES}")
    smaller = max(32, 8 * round(auto_input_size * 2 / 3 / 8))
    sizes = sorted({auto_input_size, smaller}, reverse=True)
    grid = []
    if "trunk" in families:
        grid += [
            Candidate(TRUNK, trunk_blocks=b, input_size=s) for b in TRUNK_BLOCKS for s in sizes
        ]
    for model, widths in SCRATCH_WIDTHS.items():
        if model in families:
            grid += [Candidate(model, width=width) for width in widths]
    return grid


@dataclass(frozen=True)
class Budget:
    """What the deployed int8 student may cost: file size, and single-image latency."""

    max_bytes: int
    max_latency_ms_b1: float
    latency_from: str  # how the latency limit was set: the user's ms, or a ratio of the teacher's

    def fits(self, int8_bytes: float, latency_ms_b1: float) -> bool:
        return int8_bytes <= self.max_bytes and latency_ms_b1 <= self.max_latency_ms_b1

    def hopeless(self, int8_bytes: float, latency_ms_b1: float) -> bool:
        """Over budget before training: the size exactly, the latency beyond timing noise."""
        return (
            int8_bytes > self.max_bytes
            or latency_ms_b1 > self.max_latency_ms_b1 * PRUNE_LATENCY_MARGIN
        )


@dataclass
class Row:
    """One candidate and quantization method: what ``pareto.csv`` holds."""

    candidate: str
    model: str
    trunk_blocks: int | None
    width: int | None
    input_size: int | None
    method: str  # ptq | qat | "" (pruned or failed before quantization)
    status: str  # ok | pruned | failed
    params: int | None = None
    int8_bytes: int | None = None
    latency_ms_b1: float | None = None
    latency_ms_b64: float | None = None
    val_f1_macro_fp32: float | None = None
    val_f1_macro_int8: float | None = None
    fit_seconds: float | None = None
    within_budget: bool = False
    on_front: bool = False
    winner: bool = False
    note: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, candidate: Candidate, method: str, status: str, **values: Any) -> Row:
        return cls(
            candidate=candidate.name, model=candidate.model, trunk_blocks=candidate.trunk_blocks,
            width=candidate.width, input_size=candidate.input_size, method=method, status=status,
            overrides=candidate.overrides() | ({"quantize.method": method} if method else {}),
            **values,
        )  # fmt: skip

    @property
    def name(self) -> str:
        return f"{self.candidate}-{self.method}" if self.method else self.candidate


def spread(
    candidates: Sequence[Candidate], latency: dict[str, float], trials: int
) -> list[Candidate]:
    """``trials`` of ``candidates`` spread evenly over their latency range (all if fewer):
    the front is explored from the fastest to the slowest, not bunched at one end."""
    ordered = sorted(candidates, key=lambda c: (latency[c.name], c.name))
    if trials >= len(ordered):
        return ordered
    if trials == 1:
        return [ordered[-1]]
    step = (len(ordered) - 1) / (trials - 1)
    return [ordered[round(i * step)] for i in range(trials)]


def impossible_budget(rows: Iterable[Row], budget: Budget) -> str:
    """Why nothing measured fits: the smallest and the fastest candidate, with their numbers."""
    measured = [r for r in rows if r.int8_bytes is not None and r.latency_ms_b1 is not None]
    if not measured:
        return "no candidate could be measured"
    smallest = min(measured, key=lambda r: r.int8_bytes)
    fastest = min(measured, key=lambda r: r.latency_ms_b1)
    return (
        f"no student fits the budget of {kb(budget.max_bytes)} and "
        f"{budget.max_latency_ms_b1:.3f} ms per image ({budget.latency_from}): the smallest "
        f"measured, {smallest.name}, is {kb(smallest.int8_bytes)} at "
        f"{smallest.latency_ms_b1:.3f} ms; the fastest, {fastest.name}, is "
        f"{kb(fastest.int8_bytes)} at {fastest.latency_ms_b1:.3f} ms. "
        "Raise --max-kb or --max-latency-ms"
    )


def kb(size: float) -> str:
    """Bytes as KB of 1000 bytes, as ``--max-kb`` counts them."""
    return f"{size / 1000:,.1f} KB"


def mark_front(rows: list[Row]) -> None:
    """``on_front``: no other fitted row is at least as good in val macro-F1, latency and size,
    and better in one of them. Sizes count in whole KB: the same network's PTQ and QAT files
    differ by a few bytes of metadata, which is no trade-off."""
    fitted = [r for r in rows if r.status == "ok"]

    def scores(row: Row) -> tuple[float, float, int]:  # each: lower is better
        return (-row.val_f1_macro_int8, row.latency_ms_b1, round(row.int8_bytes / 1000))

    def dominates(a: Row, b: Row) -> bool:
        pairs = list(zip(scores(a), scores(b), strict=True))
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    for row in fitted:
        row.on_front = not any(dominates(other, row) for other in fitted if other is not row)


def choose(rows: list[Row], budget: Budget) -> Row | None:
    """The best val macro-F1 of the int8 student within the budget (then the faster); test is
    never looked at. Sets ``within_budget`` and ``winner``."""
    fitted = [r for r in rows if r.status == "ok"]
    for row in fitted:
        row.within_budget = budget.fits(row.int8_bytes, row.latency_ms_b1)
    eligible = [r for r in fitted if r.within_budget]
    if not eligible:
        return None
    best = max(eligible, key=lambda r: (r.val_f1_macro_int8, -r.latency_ms_b1, -r.int8_bytes))
    best.winner = True
    return best


COLUMNS = [name for name in Row.__dataclass_fields__ if name != "overrides"]


def write_csv(path: Path, rows: list[Row]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return path


def plot_front(path: Path, rows: list[Row], budget: Budget, title: str) -> Path:
    """Val macro-F1 of the int8 student against its single-image latency; marker area is the
    int8 file's size; the latency budget drawn, the front joined and the winner starred."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fitted = [r for r in rows if r.status == "ok"]
    largest = max((r.int8_bytes for r in fitted), default=1)
    figure = Figure(figsize=(7.5, 5))
    axis = figure.add_subplot()
    for method, marker in (("ptq", "o"), ("qat", "s")):
        for inside, colour in ((True, "tab:blue"), (False, "tab:gray")):
            group = [r for r in fitted if r.method == method and r.within_budget == inside]
            if group:
                axis.scatter(
                    [r.latency_ms_b1 for r in group], [r.val_f1_macro_int8 for r in group],
                    s=[20 + 400 * r.int8_bytes / largest for r in group], marker=marker,
                    c=colour, alpha=0.6, edgecolors="black", linewidths=0.5,
                    label=f"{method.upper()}, {'within' if inside else 'over'} budget",
                )  # fmt: skip
    # the line: the accuracy-latency front (each point better than every faster one); the
    # size dimension is in the markers, so a front row below the line is there for its size
    front, best = [], -1.0
    for row in sorted((r for r in fitted if r.on_front), key=lambda r: r.latency_ms_b1):
        if row.val_f1_macro_int8 > best:
            front.append(row)
            best = row.val_f1_macro_int8
    if front:
        axis.plot([r.latency_ms_b1 for r in front], [r.val_f1_macro_int8 for r in front],
                  color="tab:orange", linewidth=1, label="front: F1 against latency")  # fmt: skip
    for row in fitted:
        axis.annotate(row.name, (row.latency_ms_b1, row.val_f1_macro_int8), fontsize=6,
                      xytext=(4, 3), textcoords="offset points")  # fmt: skip
    axis.axvline(budget.max_latency_ms_b1, color="tab:red", linestyle="--", linewidth=1,
                 label=f"latency budget {budget.max_latency_ms_b1:.3f} ms")  # fmt: skip
    winner = [r for r in fitted if r.winner]
    if winner:
        axis.scatter([winner[0].latency_ms_b1], [winner[0].val_f1_macro_int8], marker="*",
                     s=300, c="gold", edgecolors="black", zorder=5,
                     label=f"winner: {winner[0].name}")  # fmt: skip
    axis.set_xlabel("int8 student latency, 1 image (ms)")
    axis.set_ylabel("int8 student val macro-F1")
    size = f"marker area: int8 file size; size budget {kb(budget.max_bytes)}"
    axis.set_title(f"{title}\n{size}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    return path


def experiment_name(row: Row) -> str:
    """A ``dvc exp`` name for the winner: ``tune-`` and its candidate name, git-ref safe."""
    return "tune-" + "".join(c if c.isalnum() or c == "-" else "-" for c in row.name)


def set_args(row: Row) -> list[str]:
    """``dvc exp run -S`` arguments that make the pipeline's student the winner."""
    return [f"{key}={_yaml(value)}" for key, value in row.overrides.items()]


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
