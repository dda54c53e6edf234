"""The optuna study behind a search: multi-objective, seeded, stored in SQLite, resumable, budgeted.

Objectives: the stage's objective (latency or size; minimised) and the worst task's margin over its floor
(retention - floor; maximised). The study lives in ``<checkpoint dir>/study.db``:

* a search killed mid-trial leaves that trial RUNNING; reopening marks it FAIL and enqueues its parameters
  once, so it is retried, while every finished (completed or early-stopped) trial is kept and never trained again;
* the sampler is seeded with ``seed + trials so far``, so a resumed search does not replay the first session's
  proposals;
* a proposal equal to a finished trial is not trained: it is recorded as a duplicate (not counted against the
  budget) and an unseen setting is enqueued instead;
* the budget counts trained trials over every session (``trials``) and this session's wall time (``seconds``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import RecipeError
from compressor.search.candidate import EarlyStopped, Measured
from compressor.search.space import Knobs, Space, params_key

STUDY_NAME = "search"


def make_sampler(kind: str, seed: int) -> Any:
    import optuna

    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def open_study(path: Path, fingerprint: dict[str, Any], sampler: str, seed: int) -> Any:
    """Create or reopen the study at ``path``; a study of another space or source is an error."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["minimize", "maximize"],
                                load_if_exists=True, sampler=make_sampler(sampler, seed))
    stored = study.user_attrs.get("fingerprint")
    key = json.dumps(fingerprint, sort_keys=True, default=str)
    if stored is None:
        study.set_user_attr("fingerprint", key)
    elif stored != key:
        raise RecipeError(f"{path}: the checkpointed search was made with another space, source model or recovery; "
                          f"delete {path.parent} to start afresh")
    trials = study.get_trials(deepcopy=False)
    for t in trials:  # killed mid-trial: never finished
        if t.state == TrialState.RUNNING:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    finished = {params_key(t.params) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    waiting = {params_key(t.params) for t in trials if t.state == TrialState.WAITING}
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if (t.state == TrialState.FAIL and t.number not in retried and t.params
                and params_key(t.params) not in finished | waiting):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            waiting.add(params_key(t.params))
    study.sampler = make_sampler(sampler, seed + len(trials))
    return study


@dataclass
class SearchLoop:
    """Runs trials until the budget is spent or the space is exhausted.

    ``evaluate(number, knobs)`` trains and measures one candidate (raising :class:`EarlyStopped` to stop it);
    ``attrs(measured)`` turns a result into the trial's user attributes; ``values(measured)`` into the two
    objective values.
    """

    study: Any
    space: Space
    evaluate: Callable[[int, Knobs], Measured]
    values: Callable[[Measured], tuple[float, float]]
    attrs: Callable[[Measured], dict[str, Any]]
    early_attrs: Callable[[EarlyStopped], dict[str, Any]]
    budget: Any
    log: Callable[[str], None] = print

    def trained(self) -> list[Any]:
        from optuna.trial import TrialState

        return [t for t in self.study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "duplicate_of" not in t.user_attrs]

    def run(self) -> dict[str, Any]:
        """Train trials until a budget is spent or the space is exhausted (a progress bar counts the trials)."""
        from compressor.console import progress

        with progress("search: trials", total=self.budget.trials) as advance:
            advance(len(self.trained()), "resumed" if self.trained() else None)
            return self._run(advance)

    def _run(self, advance: Any) -> dict[str, Any]:
        from optuna.trial import TrialState

        started = time.monotonic()
        new = 0
        stop = "budget"
        uncut = self.space.uncut_params()
        if uncut is not None and not self.study.get_trials(deepcopy=False):
            self.study.enqueue_trial(uncut)  # a fresh study measures the source as it is first
        while True:
            done = self.trained()
            if self.budget.trials is not None and len(done) >= self.budget.trials:
                stop = "trials budget"
                break
            if self.budget.seconds is not None and time.monotonic() - started >= self.budget.seconds:
                stop = "time budget"
                break
            seen = {params_key(t.params): t for t in done}
            if len(seen) >= self.space.size:
                stop = "space exhausted"
                break
            trial = self.study.ask(self.space.distributions())
            key = params_key(trial.params)
            if key in seen:
                trial.set_user_attr("duplicate_of", seen[key].number)
                self.study.tell(trial, state=TrialState.PRUNED)
                fresh = self.space.random_params(set(seen), seed=trial.number)
                if fresh is not None:
                    self.study.enqueue_trial(fresh)
                continue
            knobs = self.space.knobs(trial.params)
            trial.set_user_attr("knobs", knobs.to_json())
            trial.set_user_attr("describe", knobs.describe())
            t0 = time.monotonic()
            self.log(f"trial {trial.number}: {knobs.describe()}")
            advance(0, f"trial {trial.number} training")
            try:
                measured = self.evaluate(trial.number, knobs)
            except EarlyStopped as stopped:
                for k, v in {**self.early_attrs(stopped), "seconds": time.monotonic() - t0}.items():
                    trial.set_user_attr(k, v)
                self.study.tell(trial, state=TrialState.PRUNED)
                new += 1
                self.log(f"trial {trial.number}: early-stopped")
                advance(1, f"trial {trial.number} early-stopped")
                continue
            except BaseException:
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            for k, v in {**self.attrs(measured), "seconds": time.monotonic() - t0}.items():
                trial.set_user_attr(k, v)
            self.study.tell(trial, list(self.values(measured)))
            new += 1
            advance(1, f"trial {trial.number} done")
        return {"stopped_by": stop, "trained_this_session": new, "trained_total": len(self.trained()),
                "seconds_this_session": round(time.monotonic() - started, 1)}
