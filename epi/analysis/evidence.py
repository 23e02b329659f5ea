"""From run records to decided claims: paired per-seed effects of a named measure, read by the one rule.

A claim compares two arms over the same seeds. Runs pair on (base seed, seed) — two arms with the same seeds
share the base model, the data order and the evaluation prompts — and on the order of a sequential run.
Orders are **averaged inside a seed**: two seeds × two orders are two replicates, not four (the orders of
one seed share the base model and are not independent). Each seed's effect keeps its per-prompt
differences when both arms recorded them (`per_prompt`, `final_prompt_scores`), so the bootstrap of
`epi.analysis.stats.verdict` resamples seeds and then prompts; records without them fall back to per-seed
numbers (bootstrap over seeds only) and the verdict line says "prompts: not recorded".

Measures (MEASURES), each method − baseline per pair:
  mean_score       (mix)        tasks × prompts of final_prompt_scores; per seed: mean of final_scores
  forgetting_A     (sequential) A after A − A after B, per prompt of stage_scores[0|1][A]
  learning_B       (sequential) B after B − B after A, per prompt of stage_scores[0|1][B]
  retention_A      (sequential) (A after B)/(A after A), per seed only (a ratio: no prompt stage); a run
                                that never learned A (A after A = 0) has none and is left out
  forgetting_mean  (forgetting) base − final on each kept (untrained) task, tasks × prompts
  learning_mean    (forgetting) final − base on each trained task, tasks × prompts

An arm is selected by `label(record)`: the config's method, or the arm label the record carries (e.g.
`full_sft@lr=0.0003` for a run at another learning rate), so runs of one method at two settings never pair.
`seesaw` reads the mix against the single-task references as the papers define a seesaw.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import stats
from .metrics import mean_sd, retention

log = logging.getLogger(__name__)

# a numpy scalar's repr inside a text (numpy ≥ 2 prints np.float64(-0.105) inside lists and f"{x!r}")
_NUMPY_REPR = re.compile(r"np\.(?:float|int|uint|bool_?)\w*\((.*?)\)")


def plain(text: str) -> str:
    """Return `text` with numpy scalar reprs written as plain numbers ("np.float64(-0.105)" → "-0.105")."""
    return _NUMPY_REPR.sub(r"\1", str(text))


def claim(claim: str, measured: str, verdict: str, evidence: str = "", decision: Optional[dict] = None) -> dict:
    """Return one claim row; verdict is one of stats.VERDICTS (say "not supported" when it is not).

    measured and evidence are stored as plain text (numpy scalar reprs become numbers); decision, when given,
    is `Verdict.to_dict()` of the rule that decided it (the report counts these claims for multiplicity)."""
    if verdict not in stats.VERDICTS:
        raise ValueError(f"verdict must be one of {stats.VERDICTS}, got {verdict!r}")
    row = {"claim": plain(claim), "measured": plain(measured), "verdict": verdict, "evidence": plain(evidence)}
    if decision is not None:
        row["decision"] = decision
    return row


def label(record: dict) -> str:
    """Return the arm a record belongs to: the `arm` the runner wrote (ExperimentConfig.arm, e.g.
    `full_sft@lr=0.0003`), else the config's method (records made before arms existed) — as compare.run_row's
    `method` column."""
    return record.get("arm") or record["config"]["method"]


# ------------------------------------------------------------------------------------------------ measures

def _prompts(entry) -> Optional[np.ndarray]:
    pp = entry.get("per_prompt") if isinstance(entry, dict) else None
    return None if pp is None else np.asarray(pp, dtype=float)


def _final_prompts(rec: dict, task: str) -> Optional[np.ndarray]:
    pp = (rec.get("final_prompt_scores") or {}).get(task)
    return None if pp is None else np.asarray(pp, dtype=float)


def _rows(parts: List[Tuple[Optional[np.ndarray], Optional[np.ndarray]]]):
    # rows of a − b per prompt, or None when any side lacks per-prompt scores
    if any(a is None or b is None for a, b in parts):
        return None
    for a, b in parts:
        if a.shape != b.shape:
            raise ValueError(f"per-prompt scores of one run differ in length ({a.size} vs {b.size}): the two "
                             "evaluations did not score the same prompts")
    return [a - b for a, b in parts]


def _mean_score(rec):
    tasks = rec["config"]["tasks"]
    value = float(np.mean([rec["final_scores"][t] for t in tasks]))
    rows = [_final_prompts(rec, t) for t in tasks]
    return value, None if any(r is None for r in rows) else rows


def _stage(rec, k, task):
    entry = rec["stage_scores"][k][task]
    return entry["score"], _prompts(entry)


def _forgetting_a(rec):
    a = rec["config"]["tasks"][0]
    (s0, p0), (s1, p1) = _stage(rec, 0, a), _stage(rec, 1, a)
    return s0 - s1, _rows([(p0, p1)])


def _learning_b(rec):
    b = rec["config"]["tasks"][1]
    (s0, p0), (s1, p1) = _stage(rec, 0, b), _stage(rec, 1, b)
    return s1 - s0, _rows([(p1, p0)])


def _retention_a(rec):
    a = rec["config"]["tasks"][0]
    return retention(a_after_a=_stage(rec, 0, a)[0], a_after_b=_stage(rec, 1, a)[0]), None


def _kept(rec):
    cfg = rec["config"]
    return [t for t in cfg["tasks"] if t not in cfg["train_tasks"]]


def _forgetting_mean(rec):
    kept = _kept(rec)
    value = float(np.mean([rec["base_scores"][t]["score"] - rec["final_scores"][t] for t in kept]))
    return value, _rows([(_prompts(rec["base_scores"][t]), _final_prompts(rec, t)) for t in kept])


def _learning_mean(rec):
    trained = rec["config"]["train_tasks"]
    value = float(np.mean([rec["final_scores"][t] - rec["base_scores"][t]["score"] for t in trained]))
    return value, _rows([(_final_prompts(rec, t), _prompts(rec["base_scores"][t])) for t in trained])


@dataclass(frozen=True)
class Measure:
    """A named quantity of one run: its protocol and how to read it (per-seed value, per-prompt rows or None)."""

    protocol: str
    read: Callable[[dict], Tuple[float, Optional[list]]]
    what: str


MEASURES: Dict[str, Measure] = {
    "mean_score": Measure("mix", _mean_score, "mean final score over the tasks"),
    "forgetting_A": Measure("sequential", _forgetting_a, "A after A − A after B"),
    "learning_B": Measure("sequential", _learning_b, "B after B − B after A"),
    "retention_A": Measure("sequential", _retention_a, "(A after B) / (A after A)"),
    "forgetting_mean": Measure("forgetting", _forgetting_mean, "base − final score on the untrained tasks"),
    "learning_mean": Measure("forgetting", _learning_mean, "final − base score on the trained tasks"),
}


# ------------------------------------------------------------------------------------------------ pairing

@dataclass(frozen=True)
class Unit:
    """One run's value of a measure: arm, replicate key (base seed, seed), order, value and per-prompt rows."""

    arm: str
    seed: tuple
    order: str
    value: float
    rows: Optional[list] = None


@dataclass(frozen=True)
class Paired:
    """The paired per-seed effects of two arms (orders averaged within a seed)."""

    method: str
    baseline: str
    seeds: List[tuple]                    # replicate keys (base seed, seed), in order
    orders: List[str]                     # the orders seen ("" for protocols without one)
    effects: list                         # per seed: a number, or per-prompt rows (method − baseline)
    method_values: List[float]            # per seed: the method's value (orders averaged)
    baseline_values: List[float]          # per seed: the baseline's own value (for the floor)
    prompts_recorded: bool

    def note(self) -> str:
        """Return how the pairs were formed, e.g. "2 seeds (orders a->b, b->a averaged within each)"."""
        orders = [o for o in self.orders if o]
        within = f" (orders {', '.join(orders)} averaged within each)" if len(orders) > 1 else ""
        return f"{len(self.seeds)} paired seed(s){within}"


def _seed_key(rec: dict) -> tuple:
    # (base seed, seed); a run without its own base seed started from the base of its seed (compare.run_row)
    base = rec["config"].get("base_seed")
    return (rec["seed"] if base is None else base, rec["seed"])


def record_units(records: Sequence[dict], measure: str, label: Callable[[dict], str] = label) -> List[Unit]:
    """Return one Unit per record of the measure's protocol (records of other protocols are skipped)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {list(MEASURES)}, got {measure!r}")
    m = MEASURES[measure]
    out = []
    for rec in records:
        cfg = rec["config"]
        if cfg["protocol"] != m.protocol:
            continue
        value, rows = m.read(rec)
        if not math.isfinite(value):
            log.warning("evidence: %s of %s seed %s is undefined (%s); the run is left out", measure, label(rec),
                        rec["seed"], m.what)
            continue
        order = "->".join(cfg["tasks"]) if m.protocol == "sequential" else ""
        out.append(Unit(label(rec), _seed_key(rec), order, value, rows))
    return out


def frame_units(frame, column: str) -> List[Unit]:
    """Return one Unit per row of a summary frame (columns method, seed, `column`, and direction when the runs
    have an order); a frame has no per-prompt scores."""
    for name in ("method", "seed", column):
        if name not in frame:
            raise ValueError(f"frame has no column {name!r} (columns: {list(frame.columns)})")
    base_seed = frame["base_seed"] if "base_seed" in frame else [None] * len(frame)
    order = frame["direction"] if "direction" in frame else [""] * len(frame)
    return [Unit(str(m), (int(s) if b is None or b != b else int(b), int(s)), str(o), float(v))
            for m, s, b, o, v in zip(frame["method"], frame["seed"], base_seed, order, frame[column])
            if v == v]  # a missing cell (nan) is no run of this measure


def _index(units: List[Unit], arm: str) -> Dict[tuple, Unit]:
    out: Dict[tuple, Unit] = {}
    for u in units:
        if u.arm != arm:
            continue
        key = (u.seed, u.order)
        if key in out and (out[key].value != u.value):
            raise ValueError(f"two runs of arm {arm!r} at seed {u.seed[1]} (base seed {u.seed[0]}) "
                             f"{('order ' + u.order) if u.order else ''} disagree ({out[key].value} vs {u.value}): "
                             "pass one of them, or label runs with different settings as different arms")
        out.setdefault(key, u)
    return out


def pair_units(units: List[Unit], method: str, baseline: str) -> Paired:
    """Return the paired per-seed effects of `method` − `baseline` over the units both arms have."""
    m, b = _index(units, method), _index(units, baseline)
    keys = sorted((k for k in m if k in b), key=lambda k: (k[0], k[1]))
    unpaired = sorted(set(m) ^ set(b), key=str)
    if unpaired:
        log.info("evidence: %d run(s) of %s/%s have no partner and are left out: %s", len(unpaired), method,
                 baseline, unpaired)
    seeds = list(dict.fromkeys(k[0] for k in keys))
    orders = list(dict.fromkeys(k[1] for k in keys))
    recorded = bool(keys) and all(m[k].rows is not None and b[k].rows is not None for k in keys)
    effects, m_values, b_values = [], [], []
    for s in seeds:
        inside = [k for k in keys if k[0] == s]
        m_values.append(float(np.mean([m[k].value for k in inside])))
        b_values.append(float(np.mean([b[k].value for k in inside])))
        if recorded:
            rows = []
            for k in inside:  # each order contributes its rows; the seed's effect is the mean over rows
                if len(m[k].rows) != len(b[k].rows):
                    raise ValueError(f"{method} and {baseline} at seed {s[1]} have different task lists")
                for rm, rb in zip(m[k].rows, b[k].rows):
                    if rm.shape != rb.shape:
                        raise ValueError(f"{method} and {baseline} at seed {s[1]} were scored on different numbers "
                                         f"of prompts ({rm.size} vs {rb.size}): they did not share evaluation "
                                         "prompts, so their per-prompt scores cannot pair")
                    rows.append(rm - rb)
            effects.append(rows)
        else:
            effects.append(m_values[-1] - b_values[-1])
    return Paired(method, baseline, seeds, orders, effects, m_values, b_values, recorded)


def paired_effects(records: Sequence[dict], measure: str, method: str, baseline: str,
                   label: Callable[[dict], str] = label) -> Paired:
    """Return the paired per-seed effects of a measure (method − baseline) from run records."""
    return pair_units(record_units(records, measure, label), method, baseline)


# ------------------------------------------------------------------------------------------------ decisions

def decide(paired: Paired, direction: str = "increase", minimum: float = 0.0, floor: Optional[float] = None,
           tolerance: float = 0.0) -> stats.Verdict:
    """Return the one rule's Verdict on paired effects (floor: not measured when the baseline's own mean ≤ it)."""
    return stats.verdict(paired.effects, direction=direction, minimum=minimum, tolerance=tolerance, floor=floor,
                         baseline=paired.baseline_values if floor is not None else None)


def _claim_from_paired(text: str, paired: Paired, what: str, direction: str, minimum: float,
                       floor: Optional[float], tolerance: float, evidence: str) -> dict:
    if not paired.seeds:
        return claim(text, f"no paired runs of {paired.method} and {paired.baseline}", "not measured", evidence)
    v = decide(paired, direction, minimum, floor, tolerance)
    measured = (f"{what}: {paired.baseline} {mean_sd(paired.baseline_values, 3)}, {paired.method} "
                f"{mean_sd(paired.method_values, 3)}; {v.describe()}; {paired.note()}")
    if floor is not None and v.verdict == "not measured":
        measured += f"; {paired.baseline}'s own mean ≤ floor {floor:g}: nothing to reduce"
    return claim(text, measured, v.verdict, evidence, v.to_dict())


def claim_from_runs(text: str, records: Sequence[dict], measure: str, method: str, baseline: str,
                    direction: str = "increase", minimum: float = 0.0, floor: Optional[float] = None,
                    evidence: str = "", *, tolerance: float = 0.0, label: Callable[[dict], str] = label) -> dict:
    """Return a report claim comparing two arms on `measure`, decided by the one rule from run records.

    measured carries both arms' means (± sd over seeds) and `Verdict.describe()`: effect, 95 % interval, seeds,
    prompts and rule; floor: not measured when the baseline's own mean of the measure is ≤ it (e.g. full SFT
    forgot less than the floor); tolerance: a non-inferiority claim ("as well as, up to tolerance")."""
    paired = paired_effects(records, measure, method, baseline, label)
    return _claim_from_paired(text, paired, measure, direction, minimum, floor, tolerance, evidence)


def claim_from_frame(text: str, frame, column: str, method: str, baseline: str, direction: str = "increase",
                     minimum: float = 0.0, floor: Optional[float] = None, evidence: str = "", *,
                     tolerance: float = 0.0) -> dict:
    """Return the same claim from a summary frame (one row per run: method, seed, direction, `column`): per-seed
    numbers only, orders averaged within a seed."""
    paired = pair_units(frame_units(frame, column), method, baseline)
    return _claim_from_paired(text, paired, column, direction, minimum, floor, tolerance, evidence)


# ------------------------------------------------------------------------------------------------ the seesaw

SEESAW_READINGS = ("seesaw", "interference (below on all)", "gain on all", "below on some, above on none",
                   "above on some, below on none", "no detectable difference")


@dataclass(frozen=True)
class SeesawReading:
    """Per-task effects of an arm against the single-task references, and what they read as."""

    method: str
    per_task: Dict[str, stats.Verdict]    # effect = mix − reference per task (increase = above the reference)
    above: List[str]                      # tasks whose interval lies above 0
    below: List[str]                      # tasks whose interval lies below 0
    reading: str                          # one of SEESAW_READINGS
    verdict: str                          # on the claim "a seesaw": supported / not supported / mixed / not measured

    def describe(self, digits: int = 3) -> str:
        """Return one line per task (effect and interval) followed by the reading."""
        lines = []
        for t, v in self.per_task.items():
            lo, hi = v.interval
            span = f"[{lo:+.{digits}f}, {hi:+.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else \
                "[not estimable]"
            lines.append(f"{t} {v.effect:+.{digits}f} {span}")
        return "; ".join(lines) + f" → {self.reading}"


def seesaw(records: Sequence[dict], method: str = "full_sft", label: Callable[[dict], str] = label,
           resamples: int = stats.BOOTSTRAP_RESAMPLES) -> SeesawReading:
    """Return the seesaw reading of `method`'s mix runs against the single-task reference runs of the same seeds.

    As the papers define it, a seesaw is a mix that gains over the single-task reference on some task while
    losing on another: some task's 95 % interval (the one rule's bootstrap, per task) lies above 0 *and* some
    other's below. Below on every task is interference, not a seesaw (verdict "not supported", as is "above on
    every task"); a reading where only one side is decided, or neither, is "mixed"; no reference or mix run
    of a common seed is "not measured"."""
    mix = {_seed_key(r): r for r in records if r["config"]["protocol"] == "mix" and label(r) == method}
    refs = {_seed_key(r): r for r in records if r["config"]["protocol"] == "reference"}
    seeds = [s for s in mix if s in refs]
    if not seeds:
        return SeesawReading(method, {}, [], [], "no detectable difference", "not measured")
    tasks = mix[seeds[0]]["config"]["tasks"]
    per_task = {}
    for t in tasks:
        pairs = [(_final_prompts(mix[s], t), _final_prompts(refs[s], t)) for s in seeds]
        rows = _rows(pairs)
        effects = ([[r] for r in rows] if rows is not None else
                   [mix[s]["final_scores"][t] - refs[s]["final_scores"][t] for s in seeds])
        per_task[t] = stats.verdict(effects, resamples=resamples)
    above = [t for t, v in per_task.items() if math.isfinite(v.interval[0]) and v.interval[0] > 0]
    below = [t for t, v in per_task.items() if math.isfinite(v.interval[1]) and v.interval[1] < 0]
    if above and below:
        reading, word = "seesaw", "supported"
    elif len(below) == len(tasks):
        reading, word = "interference (below on all)", "not supported"
    elif len(above) == len(tasks):
        reading, word = "gain on all", "not supported"
    elif below:
        reading, word = "below on some, above on none", "mixed"
    elif above:
        reading, word = "above on some, below on none", "mixed"
    else:
        reading, word = "no detectable difference", "mixed"
    return SeesawReading(method, per_task, above, below, reading, word)


def seesaw_claim(records: Sequence[dict], method: str = "full_sft", evidence: str = "",
                 text: str = "Seesaw: in the mix, {method} gains over the single-task reference on some task "
                             "while losing on another") -> dict:
    """Return the seesaw claim (see `seesaw`) as a report claim: per-task effects and intervals, the reading."""
    s = seesaw(records, method)
    text = text.format(method=method)
    if not s.per_task:
        return claim(text, f"no mix run of {method} with a reference run of the same seed", "not measured", evidence)
    any_v = next(iter(s.per_task.values()))
    prompts = f"{any_v.n_prompts} prompts per task" if any_v.n_prompts else "prompts: not recorded"
    measured = (f"{method} − reference per task (95% hierarchical bootstrap, {any_v.n_seeds} seed(s), {prompts}): "
                f"{s.describe()}")
    decision = {"rule": "bootstrap", "verdict": s.verdict, "reading": s.reading,
                "tasks": {t: v.to_dict() for t, v in s.per_task.items()}}
    return claim(text, measured, s.verdict, evidence, decision)
