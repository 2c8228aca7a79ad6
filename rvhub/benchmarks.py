"""Benchmark deltas on the card: set them by hand, or import lm-evaluation-harness results; ``rvhub card``.

lm-evaluation-harness (0.4.x) writes one ``results_<date>.json`` per run. The fields read here:

- ``results.<task>.<metric>,<filter>``: the score (e.g. ``"exact_match,strict-match": 0.62``), and
  ``results.<task>.<metric>_stderr,<filter>``: its standard error (a number, or ``"N/A"``);
- ``n-samples.<task>.effective`` (else ``.original``): how many examples were scored;
- ``configs.<task>.num_fewshot`` (else ``n-shot.<task>``): few-shot examples;
  ``configs.<task>.doc_to_text`` when it is a string: the prompt template;
- ``higher_is_better.<task>.<metric>``;
- ``config.model_args`` (``"pretrained=ORG/NAME,dtype=…"`` or a dict) or else top-level ``model_name``:
  the evaluated model (the target run's one names the target);
- ``chat_template`` (the template string when ``--apply_chat_template`` was on, else null),
  ``chat_template_sha``, ``fewshot_as_multiturn``, ``system_instruction``;
- ``lm_eval_version`` or else ``git_hash``: the harness version.

Every file must hold the imported task with the same few-shot, chat template and sample count: deltas
between runs with different settings would measure the settings, not the vector.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .card import BenchmarkDelta, HarnessSettings, Scores, VectorCard
from .errors import InvalidOptionError, VectorFormatError

ROLES = ("target", "plus", "minus", "control")


def import_lm_eval(
    target: str | Path,
    plus: str | Path,
    minus: str | Path | None = None,
    control: str | Path | None = None,
    *,
    scale: float = 1.0,
    tasks: Sequence[str] = (),
) -> list[BenchmarkDelta]:
    """Deltas from lm-evaluation-harness results files of the target alone, target + α·v, and optionally
    target − α·v and target + α·(a random vector of the norm of v). One delta per task, metric and filter
    found in both required files (restricted to ``tasks`` when given)."""
    files = {"target": target, "plus": plus, "minus": minus, "control": control}
    runs = {role: _load(Path(p), role) for role, p in files.items() if p is not None}
    names = sorted(set(runs["target"]["results"]) & set(runs["plus"]["results"]))
    if tasks:
        unknown = sorted(set(tasks) - set(names))
        if unknown:
            raise InvalidOptionError("--task", unknown[0], f"tasks in both the target and plus files: {names}")
        names = [t for t in names if t in tasks]
    if not names:
        raise InvalidOptionError("--lm-eval-plus", str(plus), "no task in common with the target's results file")
    model = _model_name(runs["target"])
    deltas = []
    for task in names:
        for role, run in runs.items():
            if not isinstance(run["results"].get(task, {}), dict):
                raise InvalidOptionError(f"--lm-eval-{role}", str(files[role]), f"results.{task} is not an object")
        settings = {role: _settings(run, task) for role, run in runs.items()}
        for role, s in settings.items():
            if role != "target" and s != settings["target"]:
                diff = {k: (settings["target"][k], v) for k, v in s.items() if settings["target"][k] != v}
                raise InvalidOptionError(
                    f"--lm-eval-{role}", str(files[role]),
                    f"task {task} was run with other settings than the target's: {diff}",
                )
        for key in sorted(runs["target"]["results"][task]):
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or not _is_metric(key, runs["target"]["results"][task][key]):
                continue
            values = {role: _score(run, task, key, files[role], role) for role, run in runs.items()}
            if values["plus"] is None:  # a metric the plus run did not report: not a delta
                continue
            for role, value in values.items():
                if value is None:
                    raise InvalidOptionError(f"--lm-eval-{role}", str(files[role]), f"no {task}.{key} in it")
            errs = {role: _stderr(run, task, f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
                    for role, run in runs.items()}
            s = settings["target"]
            t = runs["target"]
            deltas.append(BenchmarkDelta(
                benchmark=task,
                metric=metric,
                higher_is_better=_higher(t, task, metric),
                n=s["n"],
                harness=HarnessSettings(
                    name="lm-evaluation-harness",
                    version=_str(t.get("lm_eval_version")) or _str(t.get("git_hash")),
                    num_fewshot=s["num_fewshot"],
                    chat_template=s["chat_template"],
                    chat_template_sha256=_str(t.get("chat_template_sha")),
                    fewshot_as_multiturn=s["fewshot_as_multiturn"],
                    system_instruction=_str(t.get("system_instruction")),
                    prompt=_prompt(t, task),
                    filter=filt or None,
                ),
                target=model,
                scale=scale,
                scores=Scores(**{r: values.get(r) for r in ROLES}),  # type: ignore[arg-type]
                stderr=Scores(**{r: errs.get(r) for r in ROLES})  # type: ignore[arg-type]
                if errs["target"] is not None and errs["plus"] is not None else None,
            ))
    return deltas


def _load(path: Path, role: str) -> dict[str, Any]:
    from ._untrusted import read_json

    data = read_json(
        path,
        error=lambda reason: InvalidOptionError(f"--lm-eval-{role}", str(path), f"not a usable JSON file: {reason}"),
        allow_nan=True,
    )
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise InvalidOptionError(
            f"--lm-eval-{role}", str(path), "not an lm-evaluation-harness results file (no 'results' object)"
        )
    return data


def _settings(run: dict[str, Any], task: str) -> dict[str, Any]:
    config = _obj(_obj(run.get("configs")).get(task))
    fewshot = config.get("num_fewshot", _obj(run.get("n-shot")).get(task))
    samples = _obj(_obj(run.get("n-samples")).get(task))
    n = samples.get("effective", samples.get("original"))
    return {
        "num_fewshot": int(fewshot) if isinstance(fewshot, int) else None,
        "chat_template": bool(run.get("chat_template")) if "chat_template" in run else None,
        "fewshot_as_multiturn": run.get("fewshot_as_multiturn") if isinstance(run.get("fewshot_as_multiturn"), bool)
        else None,
        "n": int(n) if isinstance(n, int) and n > 0 else None,
    }


def _is_metric(key: str, value: Any) -> bool:
    """``metric,filter`` keys (lm-eval 0.4) and numbers are scores; ``alias`` and other text are not."""
    return "," in key or (isinstance(value, int | float) and not isinstance(value, bool))


def _score(run: dict[str, Any], task: str, key: str, path: str | Path | None, role: str) -> float | None:
    """The score ``key`` of ``task``: None when the run has none; a clear error when it is there but is not a
    finite number (a NaN or a string would otherwise drop the metric silently)."""
    results = run["results"].get(task)
    if not isinstance(results, dict) or key not in results:
        return None
    value = results[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidOptionError(
            f"--lm-eval-{role}", str(path), f"{task}.{key} is {json.dumps(value)[:40]}, not a finite number"
        )
    return float(value)


def _stderr(run: dict[str, Any], task: str, key: str) -> float | None:
    """A standard error, or None when unknown (lm-eval writes "N/A" when it has none)."""
    value = (run["results"].get(task) or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _higher(run: dict[str, Any], task: str, metric: str) -> bool:
    value = _obj(_obj(run.get("higher_is_better")).get(task)).get(metric)
    return value if isinstance(value, bool) else True


def _prompt(run: dict[str, Any], task: str) -> str | None:
    value = _obj(_obj(run.get("configs")).get(task)).get("doc_to_text")
    return value if isinstance(value, str) else None


def _obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (a results file is untrusted input)."""
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _model_name(run: dict[str, Any]) -> str:
    args = _obj(run.get("config")).get("model_args")
    if isinstance(args, str):
        args = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    if isinstance(args, dict):
        for key in ("pretrained", "model", "path"):
            if isinstance(args.get(key), str) and args[key]:
                return str(args[key])
    return _str(run.get("model_name")) or "unknown"


def edit_card(
    vector: str | Path,
    *,
    license: str | None = None,
    recommended_scale: float | None = None,
    recommended_bases: Sequence[str] | None = None,
    clear_benchmarks: bool = False,
    delta: dict[str, Any] | None = None,
    lm_eval: Mapping[str, str | Path | None] | None = None,
    lm_eval_tasks: Sequence[str] = (),
    delta_scale: float | None = None,
    render: bool = False,
) -> VectorCard:
    """Read the card of ``vector``, apply the edits given, and rewrite rvhub.json and README.md (both, each
    replaced atomically; the file manifest stays valid). With no edits, the card is only read, and README.md
    re-rendered when ``render``.

    ``delta``: the fields of one :class:`BenchmarkDelta` (``scores`` and ``harness`` as dicts);
    ``lm_eval``: results files by role (target, plus, minus, control) for :func:`import_lm_eval`.
    A new delta replaces a recorded one with the same benchmark, metric, filter and target.
    """
    folder = Path(vector)
    card = VectorCard.read(folder)
    update: dict[str, Any] = {}
    if license is not None:
        update["license"] = license
    if recommended_scale is not None:
        update["recommended_scale"] = recommended_scale
    if recommended_bases is not None:
        update["recommended_bases"] = list(recommended_bases)
    if delta_scale is not None:
        scale = delta_scale
    else:
        scale = recommended_scale if recommended_scale is not None else card.recommended_scale
    new: list[BenchmarkDelta] = []
    if delta is not None:
        try:
            new.append(BenchmarkDelta.model_validate({"scale": scale, **delta}))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise InvalidOptionError(f"benchmark delta field {where}", err.get("input"), err["msg"]) from e
    if lm_eval:
        files = {k: v for k, v in lm_eval.items() if v is not None}
        missing = [r for r in ("target", "plus") if r not in files]
        if missing:
            raise InvalidOptionError(f"--lm-eval-{missing[0]}", None, "the target and plus results files are required")
        new += import_lm_eval(**files, scale=scale, tasks=lm_eval_tasks)
    if new or clear_benchmarks:
        keys = {d.key for d in new}
        kept = [] if clear_benchmarks else [d for d in card.benchmarks if d.key not in keys]
        update["benchmarks"] = kept + new
    try:
        edited = VectorCard.model_validate({**card.model_dump(), **update})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidOptionError(where, err.get("input"), err["msg"]) from e
    extra: dict[str, str] = {}
    if "recommended_bases" in update and edited.format == "lora":
        edited, extra = _sync_adapter_base(folder, edited)
    if update or render:
        edited.write(folder, extra)
    return edited


def _sync_adapter_base(folder: Path, card: VectorCard) -> tuple[VectorCard, dict[str, str]]:
    """An adapter folder's adapter_config.json with ``base_model_name_or_path`` set from the edited
    recommended bases (PEFT's AutoPeftModel loads that model), and the card with the file's new hash."""
    from .card import FileEntry, verify_files
    from .formats import ADAPTER_CONFIG, adapter_base

    listed = [f for f in card.files if f.path == ADAPTER_CONFIG]
    if not listed:
        raise VectorFormatError(str(folder), f"{ADAPTER_CONFIG} is not in the card's file manifest")
    verify_files(folder, card.model_copy(update={"files": listed}))
    from ._untrusted import read_json

    config = read_json(folder / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise VectorFormatError(str(folder), f"{ADAPTER_CONFIG} must hold a JSON object")
    config["base_model_name_or_path"] = adapter_base(card)
    text = json.dumps(config, indent=2, sort_keys=True)  # as PeftConfig.save_pretrained writes it
    data = text.encode("utf-8")
    entry = FileEntry(path=ADAPTER_CONFIG, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    files = [entry if f.path == ADAPTER_CONFIG else f for f in card.files]
    return card.model_copy(update={"files": files}), {ADAPTER_CONFIG: text}
