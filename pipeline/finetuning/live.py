"""Per-epoch curves through DVCLive (DVC's own logger), for `dvc plots show`."""

from __future__ import annotations

import logging
from pathlib import Path

from dvclive import Live
from scmrepo.exceptions import SCMError

from pipeline.core.errors import PipelineError

# DVCLive announces the experiment it logs to on every stage; the stage's own summary line says what matters.
logging.getLogger("dvclive").setLevel(logging.WARNING)


def log_epochs(live_dir: Path, history: list[dict], keys: tuple[str, ...], best_epoch: int) -> None:
    """Per-epoch values through DVCLive: `live_dir`/plots/metrics/<key>.tsv (one row per epoch, for `dvc plots`);
    in `live_dir`/metrics.json (an output, not a DVC metric: the test scores are evaluate_finetune's) the values of
    `best_epoch`, the epoch whose weights were kept, not those of the last epoch run."""
    with _live(live_dir) as live:
        for record in history:
            for key in keys:
                live.log_metric(key, record[key])
            live.next_step()
        live.summary = {"best_epoch": best_epoch, "epochs_run": len(history)}
        live.summary.update({key: history[best_epoch - 1][key] for key in keys})


def _live(live_dir: Path) -> Live:
    # The stages' outputs are declared in dvc.yaml; DVCLive neither edits it nor saves experiments itself.
    try:
        return Live(str(live_dir), save_dvc_exp=False, dvcyaml=False)
    except SCMError as err:  # DVCLive reads the current commit, and a new repository has none (dvclive#522)
        raise PipelineError(
            f"DVCLive cannot log to {live_dir}: {err}; commit once (git add -A && git commit -m start), "
            "then run `dvc repro` again (the stages that finished are kept)"
        ) from err
