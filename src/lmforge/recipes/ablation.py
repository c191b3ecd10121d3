"""`lmforge ablation`: what did pretraining buy? The same fine-tuning from a base and from a random
initialisation of the same architecture and tokenizer, with the same data, budget and seeds, reported
side by side (mean +- sd over seeds, dev curves of both in one PNG) in `report.md` / `report.json`."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from lmforge.errors import ConfigError, LmforgeError
from lmforge.recipes.finetune import FINETUNE_TRAIN, _check_base_overrides, finetune
from lmforge.tasks.base import TaskData
from lmforge.train.config import TrainConfig


def ablation(
    task: str,
    init_from: str,
    data: TaskData = TaskData(),
    task_args: Optional[dict[str, Any]] = None,
    model: Optional[dict[str, Any]] = None,
    epochs: Optional[float] = None,
    warmup_ratio: Optional[float] = None,
    train: TrainConfig = FINETUNE_TRAIN,
    seeds: list[int] = [1, 2, 3],  # noqa: B006 (a default list is read, never changed)
    jobs: int = 1,
    name: Optional[str] = None,
    runs_dir: str = "runs",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune from INIT_FROM and from random initialisation over several seeds; report both.

    Args:
        task: classify, pair or tag.
        init_from: the pretrained base (lmforge run, transformers directory, minilm-l6).
        data: the splits (`--data.train --data.dev [--data.test] --data.text ...`), as for finetune.
        task_args: the head's options, as for finetune.
        model: the base's dropout rates for fine-tuning, both arms (`--model.dropout 0.1
            --model.attn_dropout 0.1`; default: the base's own).
        epochs: passes over the training data (the same for both arms).
        warmup_ratio: warm-up as a fraction of the steps.
        train: the training loop, the same for both arms (its seed is replaced by each of `seeds`).
        seeds: one fine-tuning per arm and seed.
        jobs: fine-tunings run at once, each in its own process (the runs are independent, so the
            numbers are those of one at a time). With more than one and no --train.threads, each
            process gets an equal share of the CPU cores (at least one thread).
        name: the ablation's folder under RUNS_DIR (default: ablation-TASK-TIMESTAMP); each fine-tuning
            is a run inside it (base-seed1, random-seed1, ...), and the report is written there.
        runs_dir: where the folder is created.
        overwrite: replace an existing ablation folder's report and runs.
    """
    from lmforge.storage import check_output

    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one, got {seeds}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a whole number of at least 1, got {jobs!r}")
    if model:
        _check_base_overrides(model)
    train = train or FINETUNE_TRAIN
    if not (data and data.dev):
        raise ConfigError("the ablation compares dev scores: give --data.dev")
    name = name or f"ablation-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = check_output(Path(runs_dir) / name, overwrite=overwrite, kind="dir", replaceable=("report.json",))
    if overwrite and root.exists():
        import shutil

        shutil.rmtree(root)
    from dataclasses import replace

    plan = [(seed, arm) for seed in seeds for arm in ("base", "random")]
    jobs = min(jobs, len(plan))
    if jobs > 1 and train.threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        train = replace(train, threads=max(1, cores // jobs))  # the cores this process may use, not the host's
    kwargs = {(seed, arm): dict(task=task, data=data, task_args=task_args, model=model, init_from=init_from,
                                random_init=arm == "random", epochs=epochs, warmup_ratio=warmup_ratio,
                                train=replace(train, seed=seed), name=f"{name}/{arm}-seed{seed}", runs_dir=runs_dir,
                                quiet=True)
              for seed, arm in plan}
    summaries: dict[tuple[int, str], dict[str, Any]] = {}

    def done(key: tuple[int, str], summary: dict[str, Any]) -> None:
        summaries[key] = summary
        seed, arm = key
        print(f"{arm:>6} seed {seed}: best dev {summary['best']['value']:.4f} at step {summary['best']['step']}"
              + (f"; test {_main(summary['test'], task):.4f}" if "test" in summary else "")
              + f" ({summary['wall_s']:.0f} s)", flush=True)

    if jobs == 1:
        for key in plan:
            done(key, finetune(**kwargs[key]))
    else:
        _run_parallel(plan, kwargs, jobs, done)
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "random": []}
    for seed, arm in plan:
        runs[arm].append({"seed": seed, **summaries[(seed, arm)]})
    from lmforge.config import to_dict

    recipe = {"train": {k: v for k, v in to_dict(train).items() if k != "seed"}, "task_args": dict(task_args or {}),
              "model": dict(model or {}), "epochs": epochs, "warmup_ratio": warmup_ratio}
    report = _report(task, init_from, data, runs, seeds, root, recipe)
    print(report["headline"], flush=True)
    print(f"report {root / 'report.md'}", flush=True)
    return report


class _Prefixed:
    """A text stream that starts every line written to STREAM with PREFIX (a worker's evaluation lines
    interleave with the other workers' on one terminal)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno, ...: the stream's own
        return getattr(self.stream, name)


def _finetune_job(kwargs: dict[str, Any]) -> dict[str, Any]:
    return finetune(**kwargs)


def _worker(job, kwargs: dict[str, Any], prefix: str, conn) -> None:
    """One fine-tuning in a worker process: its result, or the exception it raised, goes back on CONN."""
    import sys
    import traceback

    sys.stdout = _Prefixed(sys.stdout, prefix)
    try:
        result = (True, job(kwargs))
    except BaseException as e:  # noqa: BLE001 (handed to the parent, which raises it)
        if not isinstance(e, (LmforgeError, KeyboardInterrupt)):
            traceback.print_exc()  # a bug: its traceback, where it happened
        result = (False, e)
    conn.send(result)
    conn.close()


def _run_parallel(plan, kwargs, jobs: int, done, job=_finetune_job) -> None:
    """Run JOB(kwargs[key]) for every key of PLAN, JOBS fresh processes at a time ('spawn': nothing of this
    process's torch state is inherited), calling DONE(key, result) as each finishes. The first failure
    stops the others and is raised here: a user mistake keeps its one-line message, and a worker that dies
    without a word (killed for memory, say) is named with its exit code instead of being waited for."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    queue = list(plan)
    running: dict[Any, tuple[Any, Any]] = {}  # key -> (process, the pipe its result comes on)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                key = queue.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(job, kwargs[key], f"[{key[1]} seed {key[0]}] ", send))
                proc.start()
                send.close()  # the child holds the only write end: its exit means EOF here
                running[key] = (proc, recv)
            ready = wait([r for _, r in running.values()])
            for key in [k for k, (_, r) in running.items() if r in ready]:
                proc, recv = running.pop(key)
                try:
                    ok, value = recv.recv()
                except EOFError:
                    proc.join()
                    raise LmforgeError(
                        f"the {key[1]} arm's fine-tuning for seed {key[0]} ended without a result: its process exited "
                        f"with code {proc.exitcode} (a negative code is the signal that killed it; -9 is often the "
                        f"kernel out of memory: try fewer --jobs)") from None
                proc.join()
                if not ok:
                    raise value
                done(key, value)
    finally:
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.join()


def _main(values: dict[str, float], task: str) -> float:
    return values["f1" if task == "tag" else "accuracy"]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _report(task, init_from, data, runs, seeds, root: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    from lmforge import __version__
    from lmforge.storage import atomic_write_bytes, atomic_write_json, atomic_write_text

    metric = "f1" if task == "tag" else "accuracy"
    rows = {}
    for arm, items in runs.items():
        dev = [r["best"]["value"] for r in items]
        test = [_main(r["test"], task) for r in items if "test" in r]
        rows[arm] = {"dev": _mean_sd(dev), "test": _mean_sd(test) if test else None,
                     "per_seed": [{"seed": r["seed"], "dev": r["best"]["value"], "best_step": r["best"]["step"],
                                   **({"test": _main(r["test"], task)} if "test" in r else {}), "wall_s": r["wall_s"]}
                                  for r in items]}
    delta = rows["base"]["dev"][0] - rows["random"]["dev"][0]
    headline = (f"{task} dev {metric}: base {rows['base']['dev'][0]:.4f} +- {rows['base']['dev'][1]:.4f}, random init "
                f"{rows['random']['dev'][0]:.4f} +- {rows['random']['dev'][1]:.4f} ({len(seeds)} seeds): "
                f"pretraining {'+' if delta >= 0 else ''}{100 * delta:.2f} points")
    budget = runs["base"][0]
    report = {"task": task, "metric": metric, "init_from": str(init_from), "data": {k: v for k, v in vars(data).items()},
              "seeds": seeds, "steps": budget["step"], "recipe": recipe, "arms": rows, "delta_dev": delta, "headline": headline,
              "version": __version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_bytes(root / "curves.png", _curves_png(runs, metric, task))
    atomic_write_json(root / "report.json", report)
    lines = [f"# Pretraining ablation: {task} from `{init_from}` vs random initialisation", "",
             f"- data: train `{data.train}`, dev `{data.dev}`" + (f", test `{data.test}`" if data.test else ""),
             f"- the same fine-tuning for both arms: {budget['step']} steps, seeds {', '.join(map(str, seeds))}; "
             f"dev {metric} of the best checkpoint (test: that checkpoint on the test file)",
             _recipe_line(recipe),
             f"- lmforge {__version__}, {report['date']}", "",
             f"| arm | dev {metric} (mean +- sd) | test {metric} | per seed (dev) |", "|---|---|---|---|"]
    for arm, label in (("base", f"pretrained ({init_from})"), ("random", "random init")):
        r = rows[arm]
        test = f"{r['test'][0]:.4f} +- {r['test'][1]:.4f}" if r["test"] else "-"
        lines.append(f"| {label} | {r['dev'][0]:.4f} +- {r['dev'][1]:.4f} | {test} | "
                     + ", ".join(f"{p['dev']:.4f}" for p in r["per_seed"]) + " |")
    lines += ["", f"**{headline}**", "", "![dev curves](curves.png)"]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
    return report


def _recipe_line(recipe: dict[str, Any]) -> str:
    """The fine-tuning recipe both arms share, in one line of the report."""
    t = recipe["train"]
    parts = [f"lr {t['lr']:g} ({t['schedule']}"
             + (f", warm-up ratio {recipe['warmup_ratio']:g}" if recipe.get("warmup_ratio") is not None
                else f", warm-up {t['warmup_steps']} steps") + ")",
             f"batch {t['batch_size']}", f"weight decay {t['weight_decay']:g}", f"precision {t['precision']}"]
    if t.get("layer_decay") not in (None, 1.0):
        parts.append(f"layer decay {t['layer_decay']:g}")
    if recipe.get("epochs") is not None:
        parts.append(f"{recipe['epochs']:g} epoch(s)")
    if recipe.get("task_args"):
        parts.append("task_args " + ", ".join(f"{k}={v}" for k, v in sorted(recipe["task_args"].items())))
    if recipe.get("model"):
        parts.append("base " + ", ".join(f"{k}={v}" for k, v in sorted(recipe["model"].items())))
    return "- recipe: " + "; ".join(parts)


def _curves_png(runs, metric: str, task: str) -> bytes:
    from lmforge.plots import new_figure, png_bytes

    fig, ax = new_figure()
    for arm, color in (("base", "tab:blue"), ("random", "tab:orange")):
        for i, r in enumerate(runs[arm]):
            pts = [(h["step"], h[metric]) for h in r["history"] if metric in h]
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, alpha=0.8, lw=1.2,
                        label=("pretrained base" if arm == "base" else "random init") if i == 0 else None)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"dev {metric}")
    return png_bytes(fig)
